"""The one exception a user sees: it names the problem and the fix."""


class LFMError(Exception):
    """Bad input or an impossible request; the CLI prints it as one line and exits with code 2."""

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(problem if fix is None else f"{problem}. Fix: {fix}")
