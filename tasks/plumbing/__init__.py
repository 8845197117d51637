"""The plumbing every stage shares: params, paths, errors and exit codes, atomic outputs, stopping, console, redaction.

May import only the standard library, third-party packages and itself: every other part of tasks/ builds on it.
"""
