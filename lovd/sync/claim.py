"""Claiming a host id in PostgreSQL: the ownership epoch that fences stale copies.

The host row holds the SQLite instance id that owns ``host_id`` and its epoch; this
SQLite remembers the epoch it holds (meta ``pg_epoch``). The same SQLite restarting
keeps its epoch. A new SQLite (restored, or after the host row was taken over) takes
the next one, and from then on the relay's fence matches only the newest holder. A
brand-new SQLite never takes over a host id whose live sessions another SQLite wrote:
that is a restore, and the operator chooses it.
"""

from __future__ import annotations

import logging

from lovd.store import Store
from lovd.sync.pool import Conn

log = logging.getLogger(__name__)

META_EPOCH = "pg_epoch"


class SyncRefused(Exception):
    """This host may not write its rows (fenced, or a restore is due); says what to do."""


async def claim(conn: Conn, store: Store, host_id: str, upstream: str, version: str) -> int:
    """Take (or keep) ``host_id`` for this SQLite; returns the epoch to write with."""
    mine_raw = await store.meta_get(META_EPOCH)
    mine = int(mine_raw) if mine_raw else None
    instance = store.instance_id
    async with conn.transaction():
        cur = await conn.execute(
            "SELECT instance_id, epoch FROM lovd_hosts WHERE host_id = %s FOR UPDATE",
            (host_id,),
        )
        row = await cur.fetchone()
        if row is None:
            epoch = 1
            await conn.execute(
                "INSERT INTO lovd_hosts (host_id, instance_id, epoch, upstream, lovd_version)"
                " VALUES (%s, %s, %s, %s, %s)",
                (host_id, instance, epoch, upstream, version),
            )
        else:
            their_instance, their_epoch = str(row[0]), int(row[1])
            if mine is not None and mine == their_epoch and their_instance == instance:
                epoch = mine  # the same SQLite again (a restart)
            elif mine is not None:
                raise SyncRefused(
                    f"another lovd took over host_id {host_id!r} in PostgreSQL "
                    f"(epoch {their_epoch}, ours {mine}); this copy no longer writes there. "
                    "Stop this lovd, or give it its own host_id"
                )
            else:
                if their_instance != instance:
                    cur = await conn.execute(
                        "SELECT count(*) FROM lovd_sessions "
                        "WHERE host_id = %s AND status <> 'deleted'",
                        (host_id,),
                    )
                    live = (await cur.fetchone() or (0,))[0]
                    if live:
                        raise SyncRefused(
                            f"PostgreSQL holds {live} live session(s) of host_id "
                            f"{host_id!r} written by another lovd database; to take "
                            "them over, stop lovd, move lovd.db away and run 'lovd restore' "
                            "(or give this host its own host_id)"
                        )
                epoch = their_epoch + 1
                await conn.execute(
                    "UPDATE lovd_hosts SET instance_id = %s, epoch = %s, upstream = %s, "
                    "lovd_version = %s, claimed_at = now(), heartbeat_at = now() "
                    "WHERE host_id = %s",
                    (instance, epoch, upstream, version, host_id),
                )
        if row is not None and epoch == mine:
            await conn.execute(
                "UPDATE lovd_hosts SET upstream = %s, lovd_version = %s, heartbeat_at = now()"
                " WHERE host_id = %s",
                (upstream, version, host_id),
            )
    if epoch != mine:
        await store.meta_set(META_EPOCH, str(epoch))
        log.info("PostgreSQL: host_id %s claimed at epoch %d", host_id, epoch)
    return epoch
