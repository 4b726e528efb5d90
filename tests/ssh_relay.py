"""An ssh ProxyCommand that relays to HOST PORT and cuts the connection after LIMIT bytes from the
client: a network failure in the middle of a copy, made on purpose (tests/sshd.py)."""

import os
import socket
import sys
import threading


def main() -> None:
    host, port, limit = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    sock = socket.create_connection((host, port))

    def down() -> None:
        while data := sock.recv(65536):
            os.write(1, data)
        os._exit(0)

    threading.Thread(target=down, daemon=True).start()
    sent = 0
    while data := os.read(0, 65536):
        sent += len(data)
        if sent > limit:
            os._exit(0)  # the cable is pulled: both directions end at once
        sock.sendall(data)
    sock.shutdown(socket.SHUT_WR)
    threading.Event().wait(30)


if __name__ == "__main__":
    main()
