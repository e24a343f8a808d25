"""The MQTT protocol v1 shared by the fleet service and the agent (docs/protocol.md).

Light on purpose (stdlib and cryptography only): the device agent imports it.

    ids         the one rule for fleet/device ids; package ids
    topics      every topic name
    messages    JSON control messages (state, events, telemetry, block requests)
    statements  signed deployment statements (the `desired` message)
    blocks      binary block responses and the block index
    histogram   the mergeable latency histogram of telemetry windows (agent, collector, report, simulator)
    outputs     the mergeable per-window output summaries (`extra.outputs`: the rollout drift gate's data)
"""

from edgesdk.protocol.blocks import (BLOCK_SIZE, DIGEST_SIZE, HEADER_SIZE, INDEX_BLOCK, MAGIC, MAX_BLOCK_SIZE,
                                     MAX_BLOCKS_PER_REQUEST, MAX_CORRELATION_BYTES, MIN_BLOCK_SIZE, BlockResponse,
                                     BlockStatus, block_digests, index_digest)
from edgesdk.protocol.ids import (ID_RULE, check_id, check_name, check_package_id, is_sha256_hex,
                                  is_valid_id)
from edgesdk.protocol.messages import (MAX_DEPTH, MAX_JSON_BYTES, BlockRequest, DeviceState, InstallEvent,
                                       InstallEventKind, TelemetryWindow, parse_json)
from edgesdk.protocol.statements import (DEFAULT_LIFETIME_S, DeploymentStatement, SignedStatement,
                                         compare_versions, new_serial, sign_statement,
                                         undeploy_statement)
from edgesdk.protocol.topics import (ROOT, SHARE_GROUP, device_blocks, device_desired, device_desired_filter,
                                     device_events,
                                     device_state, device_telemetry, devices_filter, fleet_root, package_get,
                                     package_get_shared, parse_desired_name, parse_device_topic, parse_package_get,
                                     trust_root_topic)
