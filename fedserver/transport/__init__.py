"""gRPC: server.py (the daemon), service.py and secure_service.py (the servicers),
headers.py (ModelHeader and UpdateHeader, built and parsed for both transports; no
grpc), rpc.py (refusal -> status code), interceptor.py and auth.py (interceptors),
pacing.py, limits.py, joinlog.py. The only package, with the command line, that
imports grpc."""
