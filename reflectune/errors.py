"""Errors a user can act on. The CLI prints their message and exits non-zero."""


class ReflectuneError(Exception):
    """Base class: the message names what is wrong and how to fix it. Such an error is a fact
    about the input, the settings or the run, not a passing failure: a task that fails with
    one is not retried, unless the error says it may be (`retryable`)."""

    retryable = False


class InputFileError(ReflectuneError):
    """A dataset file cannot be read at all (bad JSON, bad bytes, missing columns)."""


class SchemaError(ReflectuneError):
    """A stage received a table without the columns it needs."""


class ModelSpecError(ReflectuneError):
    """A model spec cannot be resolved to weights on this machine."""


class MissingExtraError(ReflectuneError):
    """An optional dependency is needed for the chosen option."""


def missing_extra(package: str, extra: str, why: str) -> MissingExtraError:
    return MissingExtraError(
        f"{why} needs the '{package}' package: install it with `pip install 'reflectune[{extra}]'`"
    )


class SettingError(ReflectuneError):
    """A setting names something that does not exist where the run looks for it."""


class Interrupted(ReflectuneError):
    """The user asked the run to stop (Ctrl-C, or SIGTERM): the shard at work ends without a
    done marker. The command exits with `exit_code`: 130 after Ctrl-C, 143 after SIGTERM."""

    exit_code = 130


class ShardFailedError(ReflectuneError):
    """A stage could not finish a shard: an engine, endpoint or storage failure, not a row's
    content. Retried when its cause may pass."""

    def __init__(self, message: str, retryable: bool = True):
        super().__init__(message)
        self.retryable = retryable


class JournalFileError(ReflectuneError):
    """A file of the request journal cannot be read (cut short, damaged). A retry reads it the
    same way; deleting it mends it, at the price of its requests, so the user decides."""


class BudgetExceededError(ReflectuneError):
    """The teacher's next request could pass the run's budget: nothing more is sent. A retry
    cannot mend it; a rerun with a larger budget goes on where it stopped."""


RESUME = ("Nothing of this shard was marked done: once the cause is fixed, rerun the same command (or Retry the "
          "flow run in the Prefect UI); finished shards are reused and only unfinished ones run again")
