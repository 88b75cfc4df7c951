"""The one exception type the pipeline raises for bad input or bad state."""


class PipelineError(Exception):
    """A problem the user can fix; the message names the file or parameter and what to do."""
