"""mDNS/DNS-SD responder for the Census lab: announces one host's services with python3-zeroconf.

Run by the lab with Debian's /usr/bin/python3 inside a host namespace:
    python3 -I mdns_responder.py SPEC.json READY_FILE
SPEC.json: {"ip": "198.18.0.10", "host_name": "printer-1",
            "services": [{"instance": "Printer 1", "type": "_ipp._tcp", "port": 631,
                          "txt": {"ty": "Laser"}}]}
READY_FILE is written once every service is registered (probing done), then the responder
answers until it is killed.
"""

import json
import signal
import socket
import sys
import threading

from zeroconf import IPVersion, ServiceInfo, Zeroconf


def fqdn(name):
    """'_ipp._tcp' -> '_ipp._tcp.local.'; names already ending in '.local.' are kept."""
    name = name.rstrip(".")
    return name + "." if name.endswith(".local") else name + ".local."


def main():
    spec_path, ready_path = sys.argv[1], sys.argv[2]
    with open(spec_path, encoding="utf-8") as f:
        spec = json.load(f)
    ip = spec["ip"]
    # Only the host's own address: the lab's hosts have one interface and IPv4 only.
    zc = Zeroconf(interfaces=[ip], ip_version=IPVersion.V4Only)
    server = fqdn(spec["host_name"])
    for svc in spec["services"]:
        kind = fqdn(svc["type"])
        info = ServiceInfo(
            kind,
            f"{svc['instance']}.{kind}",
            addresses=[socket.inet_aton(ip)],
            port=svc["port"],
            properties=svc["txt"],
            server=server,
        )
        zc.register_service(info)

    stop = threading.Event()
    # SIGTERM: say goodbye so browsers drop the records; the lab itself uses SIGKILL.
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with open(ready_path, "w", encoding="utf-8") as f:
        f.write("ready\n")
    print(f"mdns responder for {server} at {ip} ready", flush=True)
    while not stop.wait(1.0):
        pass
    zc.unregister_all_services()
    zc.close()


if __name__ == "__main__":
    main()
