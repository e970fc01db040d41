"""ckptd.disk: the one reader and writer of the on-disk format.

Manifests (`manifests`), the root's listing, `latest` and leftovers (`root`), verification of listed
files (`files`), safetensors headers (`safetensors`), durable writes (`durable`), crash-safe deletes
and fencing (`removal`), the retention record (`retention`), the root's owner claim (`claims`), and
the per-user runtime paths of sockets and locks (`runtime`). It may do I/O, and imports neither
torch nor zmq: the client, the daemon and the CLI all read and write the format through it.
"""
