"""S3FD face detection as Wav2Lip ships it: `FaceAlignment(...).get_detections_for_batch(frames_bgr)`."""

from .api import Box, FaceAlignment, LandmarksType, NetworkSize

__all__ = ["Box", "FaceAlignment", "LandmarksType", "NetworkSize"]
