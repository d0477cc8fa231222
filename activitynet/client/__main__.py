"""``python -m activitynet.client``: the terminal program (see activitynet.client.terminal)."""

from .terminal import main

main()
