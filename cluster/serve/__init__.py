"""The Ray Serve application: thin deployment shells over the router (router_deployment.py) and
ReplicaHost (replica.py), the LLM-load autoscaling policy, and `expertmesh up/status/down`
(commands.py; the embedded local head is cluster/local_head.py)."""
