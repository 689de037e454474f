"""The store's database: its tables, the URL of a store.url, the engine (SQLite or PostgreSQL) and the schema
with its version. Torch-free.
"""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

from tandem.errors import UserError

SCHEMA_VERSION = 1
_BUSY_TIMEOUT_MS = 10_000
_URL_HINT = "set store.url in the serve config to a file path, sqlite:///PATH or postgresql://USER@HOST:PORT/DB"


class StoreError(UserError):
    """The database could not take a write (down, full, locked, ...): the server answers 503."""


class NotFound(UserError):
    """Feedback for a prediction that does not exist, or that another model made: the server answers 404."""

metadata = sa.MetaData()
schema_version_table = sa.Table("schema_version", metadata, sa.Column("version", sa.Integer, nullable=False))
predictions = sa.Table(
    "predictions", metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("model", sa.String(64), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("created", sa.Double, nullable=False),
    sa.Column("input_digest", sa.String(128), nullable=False),
    sa.Column("top_k", sa.Text, nullable=False),
    sa.Column("latency_ms", sa.Double, nullable=False),
    sa.Column("queue_ms", sa.Double, nullable=False),
    sa.Column("compute_ms", sa.Double, nullable=False),
    sa.Column("endpoint", sa.String(32), nullable=False),
)
feedback_table = sa.Table(
    "feedback", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("prediction_id", sa.String(64), nullable=False),
    sa.Column("model", sa.String(64), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("label", sa.Text, nullable=False),
    sa.Column("predicted", sa.Text, nullable=True),
    sa.Column("created", sa.Double, nullable=False),
    sa.Column("image", sa.LargeBinary, nullable=True),
    sa.Column("image_format", sa.String(16), nullable=True),
    sa.Index("feedback_by_model", "model", "id"),
)


def database_url(url: str) -> sa.URL:
    """The SQLAlchemy URL for a store.url: a plain path is SQLite; postgres(ql):// uses psycopg 3."""
    text = str(url).strip()
    if not text:
        raise UserError(f"store.url is empty; {_URL_HINT}")
    if "://" not in text:
        if text == ":memory:":
            raise UserError(f"store.url names an in-memory SQLite database, which would lose every prediction; "
                            f"{_URL_HINT}")
        return sa.URL.create("sqlite", database=str(Path(text).expanduser()))
    scheme, rest = text.split("://", 1)
    if scheme.lower() in ("postgresql", "postgres", "postgresql+psycopg"):
        text = "postgresql+psycopg://" + rest
    elif scheme.lower() not in ("sqlite", "sqlite+pysqlite"):
        raise UserError(f"store.url {scheme}:// is not supported (SQLite or PostgreSQL only); {_URL_HINT}")
    try:
        parsed = sa.make_url(text)
    except sa_exc.ArgumentError as e:
        raise UserError(f"store.url is not a database URL ({e}); {_URL_HINT}") from None
    if parsed.get_backend_name() == "sqlite" and parsed.database in (None, "", ":memory:"):
        raise UserError(f"store.url names an in-memory SQLite database, which would lose every prediction; {_URL_HINT}")
    return parsed


def one_line(e: BaseException) -> str:
    orig = getattr(e, "orig", None) or e
    lines = [line.strip() for line in str(orig).splitlines() if line.strip()]
    return f"{type(orig).__name__}: {lines[0] if lines else 'no message'}"


def connection_problem(e: BaseException) -> bool:
    """True when the database itself is unreachable, so retrying requests one by one cannot help."""
    return isinstance(e, (sa_exc.OperationalError, sa_exc.InterfaceError)) or bool(getattr(e, "connection_invalidated", False))


def create_engine(url: sa.URL, display_url: str, sync: str) -> sa.Engine:
    """The engine for a store URL: SQLite in WAL mode with its sync level, or PostgreSQL with a pre-ping pool."""
    if url.get_backend_name() == "sqlite":
        path = Path(url.database)
        if path.is_dir():
            raise UserError(f"store.url {display_url} is a folder; give a file path such as {path / 'tandem-serve.sqlite'}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create the folder for the store {path}: {e.strerror}; {_URL_HINT}") from None
        engine = sa.create_engine(url, connect_args={"check_same_thread": False, "timeout": _BUSY_TIMEOUT_MS / 1000},
                                  pool_size=8, max_overflow=16)
        synchronous = sync.upper()

        @sa.event.listens_for(engine, "connect")
        def _sqlite_connect(dbapi_connection, _record):
            dbapi_connection.isolation_level = None  # SQLAlchemy's BEGIN below, not pysqlite's guesswork
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA synchronous={synchronous}")
            cursor.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
            cursor.close()

        @sa.event.listens_for(engine, "begin")
        def _sqlite_begin(connection):
            connection.exec_driver_sql("BEGIN")

        return engine
    connect_args = {} if "connect_timeout" in url.query else {"connect_timeout": 10}
    try:
        return sa.create_engine(url, pool_pre_ping=True, pool_size=8, max_overflow=16, connect_args=connect_args)
    except (sa_exc.ArgumentError, sa_exc.NoSuchModuleError, ImportError) as e:
        raise UserError(f"cannot use store.url {display_url}: {one_line(e)}; {_URL_HINT}") from None


def create_schema(engine: sa.Engine, display_url: str) -> None:
    """The tables, and the schema version (a database of a newer tandem is refused)."""
    try:
        with engine.begin() as conn:
            if sa.inspect(conn).has_table("schema_version"):
                found = conn.execute(sa.select(sa.func.max(schema_version_table.c.version))).scalar()
                if found is not None and found > SCHEMA_VERSION:
                    raise UserError(
                        f"the store {display_url} has schema version {found}, newer than this tandem "
                        f"understands ({SCHEMA_VERSION}); upgrade tandem or point store.url at another database")
                metadata.create_all(conn)
                if found is None:
                    conn.execute(schema_version_table.insert().values(version=SCHEMA_VERSION))
            else:
                metadata.create_all(conn)
                conn.execute(schema_version_table.insert().values(version=SCHEMA_VERSION))
    except sa_exc.SQLAlchemyError as e:
        raise UserError(f"cannot open the store {display_url} ({one_line(e)}); check store.url in the serve "
                        "config and that the database server is running and reachable") from None
