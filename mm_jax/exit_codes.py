"""The exit codes of every mm_jax CLI, one home for their meaning (a cluster's retry policy reads them).

``REFUSED`` only ever means "the input was refused before any work started; nothing was written":
a crash once work has begun keeps its traceback and exits ``CRASH``. ``PREEMPTED`` follows a
SIGTERM/SIGUSR1 after which the run saved a checkpoint: relaunching the same command resumes it
(75 is ``EX_TEMPFAIL`` of sysexits.h, "try again later").
"""
OK = 0
CRASH = 1
REFUSED = 2
DIVERGED = 3
PREEMPTED = 75

MEANING = {OK: "done", CRASH: "crashed (traceback above)", REFUSED: "input refused before any work",
           DIVERGED: "the loss diverged (the message names the last good checkpoint)",
           PREEMPTED: "preempted after saving a checkpoint: relaunch the same command to resume"}
