"""LSE-D / LSE-C: the lip-sync metrics of Wav2Lip's paper, computed with syncnet_python's SyncNet."""
