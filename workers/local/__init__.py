"""The embedded local fleet: Redis, an S3 server, a coordinator and N trainer workers on one machine."""
