"""How edgelora runs on real machines: network emulation (emulate.py), certificates (make_certs.py),
containers and service units. Not installed with the package; run from a checkout (`python -m deploy.emulate`)."""
