"""Socket activation as systemd does it: the socket on fd 3, LISTEN_FDS=1, LISTEN_PID=our pid.

python activate.py FD COMMAND...   (FD: an inherited listening socket to pass as fd 3)
"""

import os
import sys

fd = int(sys.argv[1])
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
os.set_inheritable(3, True)
os.environ["LISTEN_FDS"] = "1"
os.environ["LISTEN_PID"] = str(os.getpid())  # exec keeps the pid
os.execv(sys.argv[2], sys.argv[2:])
