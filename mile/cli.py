"""What mile's command-line programs share: a --config flag read by ml_collections, and bad input
(a missing config file, an unknown key, a value a check refuses) reported as one ``error:`` line
with exit code 2 instead of a traceback."""

import re
import sys

from absl import flags


def config_file_error(e: BaseException) -> None:
    """One `error:` line for a --config file that is missing or does not import."""
    attempted = re.search(r"Attempted \[[^\]]*\]:\s*\n\s*(\S+)", str(e))
    while e.__cause__ is not None:
        e = e.__cause__
    if isinstance(e, SyntaxError):
        fail(f"config file {e.filename} has a syntax error at line {e.lineno}: {e.msg}; fix the file")
    missing = re.search(r"\[Errno \d+\] ([^\n]+)", str(e))
    why = missing.group(1) if missing else str(e).strip().splitlines()[0]
    path = f" {attempted.group(1)}" if attempted else ""
    fail(f"cannot load config file{path}: {why}; pass an existing file, e.g. --config configs/cpu.py")


def load_config(config_flag):
    """The parsed --config (a file that fails to load is reported here when no override touched it)."""
    try:
        cfg = config_flag.value
        cfg.keys()  # ml_collections defers a file's load error to the first use of the config
        return cfg
    except OSError as e:
        config_file_error(e)


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_flags(argv):
    """absl flag parsing, with a bad config file or override reported as one line."""
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError) as e:  # --config.<unknown key>=...
        text = str(e)
        key = re.search(r"([A-Za-z_][A-Za-z0-9_]*)", text)
        key = key.group(1) if key else text
        flag = next((a.split("=")[0] for a in argv if a.startswith("--config.") and f".{key}" in a), key)
        hint = re.search(r'Did you mean "([^"]+)"', text)
        hint = f' (did you mean "{hint.group(1)}"?)' if hint else ""
        fail(f"unknown config key in {flag}{hint}; every key is listed in configs/base.py")
    except (OSError, SyntaxError) as e:  # a --config file that is missing or does not parse
        config_file_error(e)
    except (flags.Error, ValueError) as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        # A config file's get_config(arg) that rejects its argument reaches us as "ValueError: ...".
        fail(re.sub(r"^ValueError: ", "", lines[-1]) if lines else repr(e))
