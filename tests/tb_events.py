"""Read TensorBoard event files back: TFRecord framing with its CRCs checked, tensorboardX's protobufs."""

import struct
from pathlib import Path

from tensorboardX.proto import event_pb2
from tensorboardX.record_writer import masked_crc32c


def read_events(path: Path) -> list[event_pb2.Event]:
    """Every event of one event file, or of every event file in a folder in the order TensorBoard reads them.

    Raises:
        ValueError: if a record is truncated or a CRC does not match (a reader would skip or stop there).
    """
    events = []
    path = Path(path)
    for file in [path] if path.is_file() else sorted(path.glob("events.out.tfevents.*")):
        data = file.read_bytes()
        offset = 0
        while offset < len(data):
            header = data[offset : offset + 8]
            (length,) = struct.unpack("<Q", header)
            (header_crc,) = struct.unpack("<I", data[offset + 8 : offset + 12])
            record = data[offset + 12 : offset + 12 + length]
            (record_crc,) = struct.unpack("<I", data[offset + 12 + length : offset + 16 + length])
            if header_crc != masked_crc32c(header) or len(record) != length or record_crc != masked_crc32c(record):
                raise ValueError(f"{file.name}: bad record at byte {offset}")
            offset += 16 + length
            events.append(event_pb2.Event.FromString(record))
    return events


def read_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value), ...]}`` as TensorBoard shows them.

    As TensorBoard's ``EventAccumulator`` (``purge_orphaned_data``, the default), a
    ``SessionLog.START`` at step S (what ``purge_step=S`` writes) hides the earlier events at steps >= S.
    """
    scalars: dict[str, list[tuple[int, float]]] = {}
    for event in read_events(folder):
        if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
            scalars = {tag: [(s, v) for s, v in points if s < event.step] for tag, points in scalars.items()}
        for value in event.summary.value:
            scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars
