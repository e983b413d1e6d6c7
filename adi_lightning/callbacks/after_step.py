"""AfterStep: run a function once, right after the next optimizer step (a one-shot step post-hook).

Shared by the callbacks that change the identifier after AdamW's step. Hooks run in the order they
were armed, and each callback arms its own in ``on_before_optimizer_step``, so the order of
:data:`adi_lightning.module.METHOD_CALLBACKS` is the order they act in.
"""

from __future__ import annotations

from typing import Callable


class AfterStep:
    """Holds at most one armed hook; :meth:`disarm` removes it (from ``on_train_batch_end`` or the next
    ``on_before_optimizer_step``, never from inside the optimizer's own hook loop)."""

    def __init__(self) -> None:
        self._handle = None

    def arm(self, optimizer, action: Callable[[], None]) -> None:
        """Run ``action()`` once after ``optimizer``'s next step (a second step before :meth:`disarm`
        does not run it again; a step the AMP scaler skips does not run it)."""
        self.disarm()
        done = []

        def hook(_optimizer, _args, _kwargs) -> None:
            if not done:
                action()
                done.append(True)

        self._handle = optimizer.register_step_post_hook(hook)

    def disarm(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
