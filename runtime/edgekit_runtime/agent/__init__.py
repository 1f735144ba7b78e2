"""The device agent: MQTT presence, reported and desired state (docs/mqtt-protocol.md)."""

from edgekit_runtime.agent.agent import Agent, AgentState
from edgekit_runtime.agent.link import BrokerAddress, Link, parse_broker_url
from edgekit_runtime.agent.protocol import Desired, Presence, ProtocolError, Reported, Topics

__all__ = [
    "Agent",
    "AgentState",
    "BrokerAddress",
    "Desired",
    "Link",
    "Presence",
    "ProtocolError",
    "Reported",
    "Topics",
    "parse_broker_url",
]
