"""The server side: loads a contiguous range of blocks and serves them to clients."""
