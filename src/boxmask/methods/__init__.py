"""Methods: one home per method (architecture + supervision + hooks). The engine finds a recipe's method
with :func:`method_for` and drives it through :class:`~boxmask.methods.base.Method` alone.

================  ==============================  =================  ===================
``supervision.type``  method                          networks           reads GT masks
================  ==============================  =================  ===================
``boxinst``       BoxInst (:mod:`.boxinst`)       condinst, solov2   no
``levelset``      BoxLevelSet (:mod:`.boxlevelset`)  solov2, condinst   no
``sim``           SIM (:mod:`.sim`)               condinst           no
``box2mask_t``    Box2Mask-T (:mod:`.box2mask_t`)  mask2former        no
``full``          real masks (:mod:`.full`)       condinst, solov2,  yes
                                                  mask2former
``mixed``         masks where given, else boxes   condinst, solov2   yes
================  ==============================  =================  ===================
"""

from __future__ import annotations

from ..config import Config, ConfigError
from .base import Method, combine_mask_losses, supervised_losses
from .box2mask_t import Box2MaskTMethod
from .boxinst import BoxInstMethod
from .boxlevelset import BoxLevelSetMethod
from .full import FullMethod, MixedMethod
from .sim import SIMMethod

#: ``supervision.type`` -> method class
METHODS: dict[str, type[Method]] = {m.key: m for m in (BoxInstMethod, FullMethod, MixedMethod, BoxLevelSetMethod,
                                                       SIMMethod, Box2MaskTMethod)}


def method_class(cfg: Config) -> type[Method]:
    """The method class of a recipe (``supervision.type``), after its checks (:meth:`Method.validate`).

    Raises ConfigError for an unknown type or a recipe the method cannot train.
    """
    try:
        cls = METHODS[cfg.supervision.type]
    except KeyError:
        raise ConfigError(f"supervision.type {cfg.supervision.type!r} unknown; choose from {sorted(METHODS)}") from None
    cls.validate(cfg)
    return cls


def method_for(cfg: Config, num_classes: int) -> Method:
    """A new instance of the recipe's method for ``num_classes`` classes. Raises ConfigError as :func:`method_class`."""
    return method_class(cfg)(cfg, num_classes)


__all__ = ["METHODS", "Method", "combine_mask_losses", "method_class", "method_for", "supervised_losses"]
