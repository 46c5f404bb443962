"""`minicpmv serve --replicas N`: N engine replicas on Ray Serve behind one OpenAI endpoint.

Our own Starlette app runs inside every replica (so every API feature, video knob, parser and
the web page behave exactly as in one process); a thin front deployment takes HTTP, picks the
replica by conversation (affinity.py, router.py) and streams the replica's response back.
Everything that imports Ray lives in deployments.py, router.py and launch.py; Ray is the
optional extra `minicpmv[ray]`."""
