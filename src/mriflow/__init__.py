"""mriflow: synthetic 3D brain MRI with latent flow matching."""

__version__ = "0.1.0"
