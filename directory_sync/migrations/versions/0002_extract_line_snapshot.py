"""The line snapshot of the last applied extract per kind (fast re-import).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25 19:17:23.079302
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('dir_extract_line',
    sa.Column('kind', sa.String(length=40), nullable=False),
    sa.Column('line_hash', sa.BigInteger(), nullable=False),
    sa.Column('key0', sa.String(length=320), nullable=True),
    sa.Column('key1', sa.String(length=320), nullable=True),
    sa.Column('key2', sa.String(length=320), nullable=True),
    comment='The lines of the last extract applied, per kind: a 64-bit hash and the keys each line fed. A re-import parses only the lines whose hash is new.'
    )
    with op.batch_alter_table('dir_extract_line', schema=None) as batch_op:
        batch_op.create_index('ix_dir_extract_line_kind_hash', ['kind', 'line_hash'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('dir_extract_line', schema=None) as batch_op:
        batch_op.drop_index('ix_dir_extract_line_kind_hash')

    op.drop_table('dir_extract_line')
