from .sfd_detector import SFDDetector, default_weights_path, load_net

FaceDetector = SFDDetector  # the name the original's plugin loader looks up

__all__ = ["FaceDetector", "SFDDetector", "default_weights_path", "load_net"]
