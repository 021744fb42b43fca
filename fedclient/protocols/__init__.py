"""The client's half of each protocol: handlers.py picks one from the round config
(plain, secagg, he); secagg.py and he.py are the protocols' exchanges."""
