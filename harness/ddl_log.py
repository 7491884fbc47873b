"""An event trigger that logs every DDL command applied to a database.

The log sits outside any bookkeeping of the code under test: it counts what
really reached the catalog (a table created twice by two racing workers is
two rows), so tests and the bench can check "exactly once" against it.
"""

from __future__ import annotations

__all__ = ["setup_sql"]


def setup_sql(table: str) -> str:
    """The SQL that creates ``public.<table>``, its function and the trigger.

    The table has ``command_tag``, ``object_type``, ``object_identity``,
    ``backend_pid`` and ``logged_at``, one row per command. Run it as a
    superuser: only one may create event triggers. ``table`` must be a plain
    identifier; it is not quoted.
    """
    # The function names its table with the schema so that code under test
    # which changes search_path still logs into the same place. Rows are
    # written inside the transaction of the DDL itself, so DDL that is rolled
    # back leaves no row: the log holds applied DDL only. The log table
    # itself is skipped.
    return f"""
CREATE TABLE public.{table} (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    command_tag text NOT NULL,
    object_type text,
    object_identity text,
    backend_pid integer NOT NULL,
    logged_at timestamptz NOT NULL
);

CREATE FUNCTION public.{table}_record() RETURNS event_trigger
LANGUAGE plpgsql AS $$
DECLARE
    command record;
BEGIN
    FOR command IN SELECT * FROM pg_catalog.pg_event_trigger_ddl_commands() LOOP
        IF command.object_identity IS DISTINCT FROM 'public.{table}' THEN
            INSERT INTO public.{table}
                (command_tag, object_type, object_identity, backend_pid, logged_at)
            VALUES (
                command.command_tag,
                command.object_type,
                command.object_identity,
                pg_catalog.pg_backend_pid(),
                pg_catalog.clock_timestamp()
            );
        END IF;
    END LOOP;
END
$$;

CREATE EVENT TRIGGER {table}_trigger ON ddl_command_end
    EXECUTE FUNCTION public.{table}_record();
"""
