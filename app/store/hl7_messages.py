"""The HL7 v2 messages whose results were stored, keyed by who sent them under which MSH-10."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import ColumnElement, insert, select
from sqlalchemy.ext.asyncio import AsyncConnection

from app.store.tables import hl7_message_table


@dataclass(frozen=True)
class MessageKey:
    agent: str  # the token's `sub`
    sending_application: str  # MSH-3 as sent
    sending_facility: str  # MSH-4 as sent
    control_id: str  # MSH-10

    def lock_key(self) -> str:
        return "hl7:" + "|".join(
            (self.agent, self.sending_application, self.sending_facility, self.control_id)
        )


@dataclass(frozen=True)
class ReceivedMessage:
    received: datetime
    content_hash: str
    ack: str


def _where(key: MessageKey) -> tuple[ColumnElement[bool], ...]:
    return (
        hl7_message_table.c.agent == key.agent,
        hl7_message_table.c.sending_application == key.sending_application,
        hl7_message_table.c.sending_facility == key.sending_facility,
        hl7_message_table.c.control_id == key.control_id,
    )


async def find(conn: AsyncConnection, key: MessageKey) -> ReceivedMessage | None:
    row = (
        await conn.execute(
            select(
                hl7_message_table.c.received,
                hl7_message_table.c.content_hash,
                hl7_message_table.c.ack,
            ).where(*_where(key))
        )
    ).first()
    return ReceivedMessage(*row) if row else None


async def remember(
    conn: AsyncConnection, key: MessageKey, received: datetime, content_hash: str, ack: str
) -> None:
    """Insert the message's row; the unique key refuses a second one for the same key."""
    await conn.execute(
        insert(hl7_message_table).values(
            agent=key.agent,
            sending_application=key.sending_application,
            sending_facility=key.sending_facility,
            control_id=key.control_id,
            received=received,
            content_hash=content_hash,
            ack=ack,
        )
    )
