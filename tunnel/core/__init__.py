"""The sans-IO core: pure protocol logic. Nothing here may import trio, socket, os or pyroute2;
time enters as a ``now`` argument and randomness as an argument or through PyNaCl."""
