"""Models: torchvision backbones as feature extractors (weights from a state dict), patches, memory savers and
the mixed-task forward. Nothing here knows of Lightning, files or runs: a patch works on any ``nn.Module``."""
