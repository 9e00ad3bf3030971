"""Port choice for the embedded services: a port handed to one service is never handed to the
next, even before the first has bound it (CI once saw MLflow lose its port to SeaweedFS)."""
import socket

from canao.mlops import services


def test_free_ports_are_distinct_free_and_outside_avoid():
    avoid = set(services.free_ports(300))
    ports = services.free_ports(30, avoid=avoid)
    assert len(set(ports)) == 30 and not avoid & set(ports)
    for port in ports:  # free now: each binds
        with socket.socket() as sock:
            sock.bind((services.HOST, port))
