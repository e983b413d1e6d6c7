"""adi-lightning: ADI action customization of Stable Diffusion with PyTorch Lightning."""

import logging

__version__ = "0.1.0"


class DropMessages(logging.Filter):
    """Drop log records whose message contains one of ``needles``: exact library notices a user
    cannot act on (the CLI adds more in ``adi_lightning.console.quiet_libraries``)."""

    def __init__(self, *needles: str) -> None:
        super().__init__()
        self.needles = needles

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(n in record.getMessage() for n in self.needles)


# transformers announces, when diffusers loads a pipeline, that torchvision is missing for image
# processors this project never uses (torchvision is deliberately not a dependency); on import, so
# plain-Python use of a pipeline is quiet too.
logging.getLogger("transformers.utils.import_utils").addFilter(DropMessages("requires torchvision (not installed)"))


def install_identifier(pipe, identifier_path, token=None):
    """Make a stock diffusers pipeline accept prompts with the identifier (see adi_lightning.generation)."""
    from adi_lightning.generation import install_identifier as install

    return install(pipe, identifier_path, token)


def remove_identifier(pipe):
    """Restore a pipeline changed by :func:`install_identifier`."""
    from adi_lightning.generation import remove_identifier as remove

    return remove(pipe)


__all__ = ["install_identifier", "remove_identifier", "__version__"]
