"""What the rank client and the node daemon agree on. Pure Python: no torch, no zmq, no I/O."""

from ckptd.proto.errors import ProtocolError
from ckptd.proto.formats import FORMAT_VERSION, TensorEntry
from ckptd.proto.layout import UnsafeNameError, check_safe_name
from ckptd.proto.manifest import Manifest, ManifestError
from ckptd.proto.messages import PROTOCOL_VERSION
from ckptd.proto.patterns import Placement, SharingPattern, is_writer, place
from ckptd.proto.topology import Topology

__all__ = [
    "FORMAT_VERSION",
    "PROTOCOL_VERSION",
    "Manifest",
    "ManifestError",
    "Placement",
    "ProtocolError",
    "SharingPattern",
    "TensorEntry",
    "Topology",
    "UnsafeNameError",
    "check_safe_name",
    "is_writer",
    "place",
]
