"""Directory tables: practitioners, structures, activities, mailboxes, certificates, trust space, sync runs.

Revision ID: 0001
Revises:
Create Date: 2026-11-25 18:58:42.972207
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('dir_activity',
    sa.Column('activity_key', sa.String(length=32), nullable=False),
    sa.Column('id_nat_ps', sa.String(length=20), nullable=False),
    sa.Column('structure_id', sa.String(length=40), nullable=True),
    sa.Column('know_how_type_code', sa.String(length=10), nullable=True),
    sa.Column('know_how_type', sa.String(length=100), nullable=True),
    sa.Column('know_how_code', sa.String(length=20), nullable=True),
    sa.Column('know_how', sa.String(length=200), nullable=True),
    sa.Column('practice_mode_code', sa.String(length=10), nullable=True),
    sa.Column('practice_mode', sa.String(length=100), nullable=True),
    sa.Column('sector_code', sa.String(length=20), nullable=True),
    sa.Column('sector', sa.String(length=200), nullable=True),
    sa.Column('pharmacist_section_code', sa.String(length=10), nullable=True),
    sa.Column('pharmacist_section', sa.String(length=200), nullable=True),
    sa.Column('role_code', sa.String(length=20), nullable=True),
    sa.Column('role', sa.String(length=200), nullable=True),
    sa.Column('activity_kind_code', sa.String(length=20), nullable=True),
    sa.Column('activity_kind', sa.String(length=200), nullable=True),
    sa.Column('row_hash', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('activity_key', name=op.f('pk_dir_activity'))
    )
    with op.batch_alter_table('dir_activity', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_dir_activity_id_nat_ps'), ['id_nat_ps'], unique=False)
        batch_op.create_index(batch_op.f('ix_dir_activity_structure_id'), ['structure_id'], unique=False)

    op.create_table('dir_certificate',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('fingerprint_sha256', sa.String(length=64), nullable=False),
    sa.Column('address_key', sa.String(length=320), nullable=True),
    sa.Column('id_nat_ps', sa.String(length=20), nullable=True),
    sa.Column('usage', sa.String(length=20), nullable=False),
    sa.Column('subject', sa.Text(), nullable=False),
    sa.Column('not_before', sa.DateTime(timezone=True), nullable=False),
    sa.Column('not_after', sa.DateTime(timezone=True), nullable=False),
    sa.Column('source', sa.String(length=20), nullable=False),
    sa.Column('der', sa.LargeBinary(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_dir_certificate')),
    sa.UniqueConstraint('fingerprint_sha256', name=op.f('uq_dir_certificate_fingerprint_sha256'))
    )
    with op.batch_alter_table('dir_certificate', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_dir_certificate_address_key'), ['address_key'], unique=False)
        batch_op.create_index(batch_op.f('ix_dir_certificate_id_nat_ps'), ['id_nat_ps'], unique=False)

    op.create_table('dir_diploma',
    sa.Column('diploma_key', sa.String(length=32), nullable=False),
    sa.Column('id_nat_ps', sa.String(length=20), nullable=False),
    sa.Column('diploma_type_code', sa.String(length=20), nullable=True),
    sa.Column('diploma_type', sa.String(length=200), nullable=True),
    sa.Column('diploma_code', sa.String(length=40), nullable=True),
    sa.Column('diploma', sa.String(length=300), nullable=True),
    sa.Column('authorisation_type_code', sa.String(length=20), nullable=True),
    sa.Column('authorisation_type', sa.String(length=200), nullable=True),
    sa.Column('authorisation_discipline_code', sa.String(length=40), nullable=True),
    sa.Column('authorisation_discipline', sa.String(length=300), nullable=True),
    sa.Column('row_hash', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('diploma_key', name=op.f('pk_dir_diploma'))
    )
    with op.batch_alter_table('dir_diploma', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_dir_diploma_id_nat_ps'), ['id_nat_ps'], unique=False)

    op.create_table('dir_know_how',
    sa.Column('know_how_key', sa.String(length=32), nullable=False),
    sa.Column('id_nat_ps', sa.String(length=20), nullable=False),
    sa.Column('profession_code', sa.String(length=10), nullable=True),
    sa.Column('category_code', sa.String(length=10), nullable=True),
    sa.Column('type_code', sa.String(length=10), nullable=True),
    sa.Column('type_label', sa.String(length=100), nullable=True),
    sa.Column('code', sa.String(length=20), nullable=True),
    sa.Column('label', sa.String(length=200), nullable=True),
    sa.Column('row_hash', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('know_how_key', name=op.f('pk_dir_know_how'))
    )
    with op.batch_alter_table('dir_know_how', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_dir_know_how_id_nat_ps'), ['id_nat_ps'], unique=False)

    op.create_table('dir_mailbox',
    sa.Column('address_key', sa.String(length=320), nullable=False),
    sa.Column('address', sa.String(length=320), nullable=False),
    sa.Column('mailbox_type', sa.String(length=3), nullable=False),
    sa.Column('id_type', sa.String(length=2), nullable=True),
    sa.Column('id_pp', sa.String(length=20), nullable=True),
    sa.Column('id_nat_ps', sa.String(length=20), nullable=True),
    sa.Column('structure_id_type', sa.String(length=10), nullable=True),
    sa.Column('structure_id', sa.String(length=40), nullable=True),
    sa.Column('service', sa.String(length=300), nullable=True),
    sa.Column('civility', sa.String(length=60), nullable=True),
    sa.Column('last_name', sa.String(length=200), nullable=True),
    sa.Column('first_name', sa.String(length=200), nullable=True),
    sa.Column('category_code', sa.String(length=10), nullable=True),
    sa.Column('category', sa.String(length=200), nullable=True),
    sa.Column('profession_code', sa.String(length=10), nullable=True),
    sa.Column('profession', sa.String(length=200), nullable=True),
    sa.Column('know_how_code', sa.String(length=20), nullable=True),
    sa.Column('know_how', sa.String(length=200), nullable=True),
    sa.Column('dematerialisation', sa.String(length=20), nullable=True),
    sa.Column('structure_name', sa.String(length=300), nullable=True),
    sa.Column('structure_trade_name', sa.String(length=300), nullable=True),
    sa.Column('address_line2', sa.String(length=200), nullable=True),
    sa.Column('address_line3', sa.String(length=200), nullable=True),
    sa.Column('street_number', sa.String(length=20), nullable=True),
    sa.Column('street_number_complement', sa.String(length=20), nullable=True),
    sa.Column('street_type', sa.String(length=60), nullable=True),
    sa.Column('street', sa.String(length=200), nullable=True),
    sa.Column('locality', sa.String(length=200), nullable=True),
    sa.Column('routing_line', sa.String(length=200), nullable=True),
    sa.Column('postal_code', sa.String(length=10), nullable=True),
    sa.Column('department', sa.String(length=60), nullable=True),
    sa.Column('country', sa.String(length=100), nullable=True),
    sa.Column('liste_rouge', sa.Boolean(), nullable=False),
    sa.Column('description', sa.Text(), nullable=True),
    sa.Column('fhir_ref', sa.String(length=200), nullable=True),
    sa.Column('source', sa.String(length=10), nullable=False),
    sa.Column('row_hash', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('address_key', name=op.f('pk_dir_mailbox'))
    )
    with op.batch_alter_table('dir_mailbox', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_dir_mailbox_fhir_ref'), ['fhir_ref'], unique=False)
        batch_op.create_index(batch_op.f('ix_dir_mailbox_id_nat_ps'), ['id_nat_ps'], unique=False)
        batch_op.create_index(batch_op.f('ix_dir_mailbox_structure_id'), ['structure_id'], unique=False)

    op.create_table('dir_practitioner',
    sa.Column('id_nat_ps', sa.String(length=20), nullable=False),
    sa.Column('id_type', sa.String(length=2), nullable=True),
    sa.Column('id_pp', sa.String(length=20), nullable=True),
    sa.Column('exercise_civility_code', sa.String(length=10), nullable=True),
    sa.Column('exercise_civility', sa.String(length=60), nullable=True),
    sa.Column('civility_code', sa.String(length=10), nullable=True),
    sa.Column('civility', sa.String(length=60), nullable=True),
    sa.Column('last_name', sa.String(length=200), nullable=True),
    sa.Column('first_name', sa.String(length=200), nullable=True),
    sa.Column('profession_code', sa.String(length=10), nullable=True),
    sa.Column('profession', sa.String(length=200), nullable=True),
    sa.Column('category_code', sa.String(length=10), nullable=True),
    sa.Column('category', sa.String(length=200), nullable=True),
    sa.Column('row_hash', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('id_nat_ps', name=op.f('pk_dir_practitioner'))
    )
    op.create_table('dir_structure',
    sa.Column('structure_id', sa.String(length=40), nullable=False),
    sa.Column('siret', sa.String(length=14), nullable=True),
    sa.Column('siren', sa.String(length=9), nullable=True),
    sa.Column('finess_site', sa.String(length=9), nullable=True),
    sa.Column('finess_legal', sa.String(length=9), nullable=True),
    sa.Column('name', sa.String(length=300), nullable=True),
    sa.Column('trade_name', sa.String(length=300), nullable=True),
    sa.Column('addressee', sa.String(length=200), nullable=True),
    sa.Column('geo_complement', sa.String(length=200), nullable=True),
    sa.Column('street_number', sa.String(length=20), nullable=True),
    sa.Column('street_repeat', sa.String(length=10), nullable=True),
    sa.Column('street_type_code', sa.String(length=10), nullable=True),
    sa.Column('street_type', sa.String(length=60), nullable=True),
    sa.Column('street', sa.String(length=200), nullable=True),
    sa.Column('distribution', sa.String(length=200), nullable=True),
    sa.Column('cedex', sa.String(length=200), nullable=True),
    sa.Column('postal_code', sa.String(length=10), nullable=True),
    sa.Column('commune_code', sa.String(length=10), nullable=True),
    sa.Column('commune', sa.String(length=200), nullable=True),
    sa.Column('country_code', sa.String(length=10), nullable=True),
    sa.Column('country', sa.String(length=100), nullable=True),
    sa.Column('phone', sa.String(length=40), nullable=True),
    sa.Column('phone2', sa.String(length=40), nullable=True),
    sa.Column('fax', sa.String(length=40), nullable=True),
    sa.Column('email', sa.String(length=200), nullable=True),
    sa.Column('department_code', sa.String(length=10), nullable=True),
    sa.Column('department', sa.String(length=100), nullable=True),
    sa.Column('former_id', sa.String(length=40), nullable=True),
    sa.Column('registration_authority', sa.String(length=100), nullable=True),
    sa.Column('row_hash', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('structure_id', name=op.f('pk_dir_structure'))
    )
    op.create_table('dir_sync_run',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('kind', sa.String(length=40), nullable=False),
    sa.Column('source', sa.Text(), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('status', sa.String(length=20), nullable=False),
    sa.Column('forced', sa.Boolean(), nullable=False),
    sa.Column('rows_read', sa.Integer(), nullable=False),
    sa.Column('rows_malformed', sa.Integer(), nullable=False),
    sa.Column('inserted', sa.Integer(), nullable=False),
    sa.Column('updated', sa.Integer(), nullable=False),
    sa.Column('deleted', sa.Integer(), nullable=False),
    sa.Column('message', sa.Text(), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_dir_sync_run'))
    )
    op.create_table('dir_trust_domain',
    sa.Column('domain_ascii', sa.String(length=255), nullable=False),
    sa.Column('domain_unicode', sa.String(length=255), nullable=False),
    sa.Column('description', sa.Text(), nullable=True),
    sa.Column('operator_dn', sa.Text(), nullable=True),
    sa.Column('responsible_contact', sa.String(length=320), nullable=True),
    sa.Column('support_contact', sa.String(length=320), nullable=True),
    sa.Column('updated', sa.String(length=40), nullable=True),
    sa.PrimaryKeyConstraint('domain_ascii', name=op.f('pk_dir_trust_domain'))
    )
    with op.batch_alter_table('dir_trust_domain', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_dir_trust_domain_domain_unicode'), ['domain_unicode'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('dir_trust_domain', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_dir_trust_domain_domain_unicode'))

    op.drop_table('dir_trust_domain')
    op.drop_table('dir_sync_run')
    op.drop_table('dir_structure')
    op.drop_table('dir_practitioner')
    with op.batch_alter_table('dir_mailbox', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_dir_mailbox_structure_id'))
        batch_op.drop_index(batch_op.f('ix_dir_mailbox_id_nat_ps'))
        batch_op.drop_index(batch_op.f('ix_dir_mailbox_fhir_ref'))

    op.drop_table('dir_mailbox')
    with op.batch_alter_table('dir_know_how', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_dir_know_how_id_nat_ps'))

    op.drop_table('dir_know_how')
    with op.batch_alter_table('dir_diploma', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_dir_diploma_id_nat_ps'))

    op.drop_table('dir_diploma')
    with op.batch_alter_table('dir_certificate', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_dir_certificate_id_nat_ps'))
        batch_op.drop_index(batch_op.f('ix_dir_certificate_address_key'))

    op.drop_table('dir_certificate')
    with op.batch_alter_table('dir_activity', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_dir_activity_structure_id'))
        batch_op.drop_index(batch_op.f('ix_dir_activity_id_nat_ps'))

    op.drop_table('dir_activity')
