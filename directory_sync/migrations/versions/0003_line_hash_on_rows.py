"""The hash of each extract line moves onto the row the line fed (dir_extract_line goes).

A full import wrote every line twice (its row, and its hash with the keys it fed in
dir_extract_line, with an index of its own): a third of the import's writes. The line
entity's row already names the keys its line fed, so it keeps the line hash itself (indexed: a
re-import reads them in order and looks up the lines that went), which is
also its content hash (and, for the rows without an identifier of their own, part of the key).

The mailboxes loaded before this revision have no line hash: the next import of the MSSanté
extract compares every key (sync.py) and fills them in. Activities, know-how and diplomas
were keyed by a digest of their content: they are derived from the extracts only, nothing
looks them up, and their keys change, so they are emptied here and the next import of their
extract inserts them again (into an empty table, no deletion brake is involved).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26 02:05:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None

LINE_TABLES = ('dir_activity', 'dir_know_how', 'dir_diploma', 'dir_mailbox')


def upgrade() -> None:
    for table in ('dir_activity', 'dir_know_how', 'dir_diploma'):
        op.execute(f'DELETE FROM {table}')
    for table in LINE_TABLES:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(sa.Column('line_hash', sa.BigInteger(), nullable=True))
            batch_op.create_index(f'ix_{table}_line_hash', ['line_hash'], unique=False)
    with op.batch_alter_table('dir_extract_line', schema=None) as batch_op:
        batch_op.drop_index('ix_dir_extract_line_kind_hash')
    op.drop_table('dir_extract_line')


def downgrade() -> None:
    # An empty snapshot: the next import under revision 0002 compares every key.
    op.create_table('dir_extract_line',
    sa.Column('kind', sa.String(length=40), nullable=False),
    sa.Column('line_hash', sa.BigInteger(), nullable=False),
    sa.Column('key0', sa.String(length=320), nullable=True),
    sa.Column('key1', sa.String(length=320), nullable=True),
    sa.Column('key2', sa.String(length=320), nullable=True),
    comment='The lines of the last extract applied, per kind: a 64-bit hash and the keys each line fed. '
            'A re-import parses only the lines whose hash is new.'
    )
    with op.batch_alter_table('dir_extract_line', schema=None) as batch_op:
        batch_op.create_index('ix_dir_extract_line_kind_hash', ['kind', 'line_hash'], unique=False)
    for table in LINE_TABLES:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_index(f'ix_{table}_line_hash')
            batch_op.drop_column('line_hash')
