class QwenlabError(Exception):
    """An error caused by user input; the CLI prints it as one line, without a traceback."""
