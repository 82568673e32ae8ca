"""The embedded default: a ~7M-parameter model trained with MiLe on the King James Bible on CPU."""

from configs import base


def get_config():
    return base.get_config()
