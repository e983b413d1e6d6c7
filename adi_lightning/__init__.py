"""adi-lightning: ADI action customization of Stable Diffusion with PyTorch Lightning."""

__version__ = "0.1.0"
