"""CamVid U-Net training: model, losses, metrics, visualisation and the distributed loop."""
