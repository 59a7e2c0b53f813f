"""latency tables measured by `bitsearch profile`, stored per tenant and referenced by searches

Revision ID: 0003a
Revises: 0002
"""

from alembic import op
import sqlalchemy as sa


revision = '0003a'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('latency_tables',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('tenant_id', sa.String(length=32), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('model_ref', sa.String(length=300), nullable=True),
    sa.Column('provider', sa.String(length=100), nullable=False),
    sa.Column('batch_size', sa.Integer(), nullable=False),
    sa.Column('table', sa.JSON(), nullable=False),
    sa.Column('details', sa.JSON(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('latency_tables', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_latency_tables_tenant_id'), ['tenant_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('latency_tables', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_latency_tables_tenant_id'))
    op.drop_table('latency_tables')
