"""adi-lightning: ADI action customization of Stable Diffusion with PyTorch Lightning."""

import logging

__version__ = "0.1.0"


class _DropTorchvisionNotice(logging.Filter):
    """transformers announces, when diffusers loads a pipeline, that torchvision is missing for image
    processors this project never uses (torchvision is deliberately not a dependency)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(_DropTorchvisionNotice())


def install_identifier(pipe, identifier_path, token=None):
    """Make a stock diffusers pipeline accept prompts with the identifier (see adi_lightning.generation)."""
    from adi_lightning.generation import install_identifier as install

    return install(pipe, identifier_path, token)


def remove_identifier(pipe):
    """Restore a pipeline changed by :func:`install_identifier`."""
    from adi_lightning.generation import remove_identifier as remove

    return remove(pipe)


__all__ = ["install_identifier", "remove_identifier", "__version__"]
