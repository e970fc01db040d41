"""ckptd.disk: the one reader and writer of the on-disk format.

Manifests (`manifests`), the root's listing, `latest` and leftovers (`root`), verification of listed
files (`files`), safetensors headers (`safetensors`), durable writes (`durable`), crash-safe deletes
and fencing (`removal`), the retention record (`retention`), the root's owner claim (`claims`), the
per-user runtime paths of sockets and locks (`runtime`), the root's record of its tiers (`tiers`), and
a checkpoint root in an object store (`objectstore`, S3 API through boto3, imported only when used).
It may do I/O, and imports neither torch nor zmq: the client, the daemon and the CLI all read and
write the format through it.
"""
