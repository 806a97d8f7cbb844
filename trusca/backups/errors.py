"""The one exception family the doors (commands, views, tasks) catch. Its messages say what
happened, what was left untouched and what to do next: they are shown to operators as they are."""


class OperationFailed(Exception):
    """A backup, restore, verify or copy that could not be done."""


class NotFound(OperationFailed):
    """No backup by that name or id."""


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived. A BaseException, like KeyboardInterrupt, so that no
    ``except Exception`` on the way up mistakes it for an ordinary failure and carries on."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"interrupted by signal {signum}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum
