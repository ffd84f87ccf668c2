/*-------------------------------------------------------------------------
 *
 * store.c
 *	  The extension's tables: rows only.
 *
 * Every statement is prepared once per process (SPI_prepare +
 * SPI_keepplan).  PostgreSQL's plan cache revalidates a kept plan when a
 * table it uses changes (ALTER EXTENSION UPDATE, DROP and CREATE
 * EXTENSION), and statements name every object with its schema and run
 * under search_path "pg_catalog, pg_temp", so a kept plan never resolves
 * to another object.  Every lookup uses an index (see the indexes of the
 * install scripts).
 *
 * The caller has connected SPI and switched to the extension owner
 * (call.c, or the worker); functions here never commit, never wait on a
 * latch, and never call the API.  The actor is an argument: rows are the
 * actor's when owner_role = actor and, with an end user, end_user matches;
 * an administrator uses every row.
 *
 * Secrets are sealed (crypt.c) with associated data naming table, column
 * and row before they are written, and opened after they are read.
 *
 * IDENTIFICATION
 *	  src/store.c
 *
 *-------------------------------------------------------------------------
 */
#include "digime.h"

#include "crypt.h"
#include "jose.h"
#include "store.h"

#include "access/htup_details.h"
#include "access/xact.h"
#include "catalog/namespace.h"
#include "catalog/pg_type.h"
#include "miscadmin.h"
#include "utils/builtins.h"
#include "utils/lsyscache.h"
#include "utils/snapmgr.h"
#include "utils/syscache.h"
#include "utils/timestamp.h"

#define MAX_ARGS 14

/* A statement prepared on first use and kept for the life of the process. */
typedef struct Stmt
{
	const char *sql;
	int			nargs;
	Oid			types[MAX_ARGS];
	SPIPlanPtr	plan;
} Stmt;

/* Parameter builder: values and nulls of one execution. */
typedef struct Params
{
	Datum		values[MAX_ARGS];
	char		nulls[MAX_ARGS];
	int			n;
} Params;

#define STMT(name, sql_, ...) \
	static Stmt name = {sql_, lengthof(((Oid[]) {__VA_ARGS__})), {__VA_ARGS__}, NULL}
#define STMT0(name, sql_) static Stmt name = {sql_, 0, {0}, NULL}

/* Rows of the actor: $2 = role, $3 = end user or NULL, $4 = administrator. */
#define ACTOR_ROWS \
	"($4 OR (owner_role OPERATOR(pg_catalog.=) $2::pg_catalog.regrole " \
	"AND ($3::pg_catalog.text IS NULL OR end_user OPERATOR(pg_catalog.=) $3)))"

static void
p_init(Params *p)
{
	p->n = 0;
}

static void
p_datum(Params *p, Datum d)
{
	p->values[p->n] = d;
	p->nulls[p->n++] = ' ';
}

static void
p_text(Params *p, const char *s)
{
	p->values[p->n] = s ? CStringGetTextDatum(s) : (Datum) 0;
	p->nulls[p->n++] = s ? ' ' : 'n';
}

static void
p_int8(Params *p, int64 v)
{
	p_datum(p, Int64GetDatum(v));
}

/* an id, NULL when 0 */
static void
p_id(Params *p, int64 v)
{
	p->values[p->n] = Int64GetDatum(v);
	p->nulls[p->n++] = v ? ' ' : 'n';
}

static void
p_ts(Params *p, TimestampTz t)
{
	p->values[p->n] = TimestampTzGetDatum(t);
	p->nulls[p->n++] = t ? ' ' : 'n';
}

/* $1 = key, then the actor as $2..$4 */
static void
p_actor(Params *p, const DmActor *a)
{
	p_datum(p, ObjectIdGetDatum(a->role));
	p_text(p, a->end_user);
	p_datum(p, BoolGetDatum(a->is_admin));
}

static uint64
run(Stmt *st, Params *p, DmRead read, int expect)
{
	int			rc;

	Assert(p == NULL || p->n == st->nargs);
	if (st->plan == NULL)
	{
		/* a generic plan: every statement is an index lookup, planning it again is waste */
		SPIPlanPtr	plan = SPI_prepare_cursor(st->sql, st->nargs, st->types,
											  CURSOR_OPT_GENERIC_PLAN);

		if (plan == NULL)
			elog(ERROR, "SPI_prepare failed (%s) for: %s",
				 SPI_result_code_string(SPI_result), st->sql);
		if (SPI_keepplan(plan) != 0)
			elog(ERROR, "SPI_keepplan failed");
		st->plan = plan;
	}
	if (read == DM_READ_LATEST)
		rc = SPI_execute_snapshot(st->plan, p ? p->values : NULL, p ? p->nulls : NULL,
								  GetLatestSnapshot(), InvalidSnapshot, false, false, 0);
	else
		rc = SPI_execute_plan(st->plan, p ? p->values : NULL, p ? p->nulls : NULL, false, 0);
	if (rc != expect)
		elog(ERROR, "%s for: %s", SPI_result_code_string(rc), st->sql);
	return SPI_processed;
}

static char *
col_text(int row, int col)
{
	return SPI_getvalue(SPI_tuptable->vals[row], SPI_tuptable->tupdesc, col);
}

static Datum
col_datum(int row, int col, bool *isnull)
{
	return SPI_getbinval(SPI_tuptable->vals[row], SPI_tuptable->tupdesc, col, isnull);
}

static int64
col_int8(int row, int col)
{
	bool		isnull;
	Datum		d = col_datum(row, col, &isnull);

	return isnull ? 0 : DatumGetInt64(d);
}

static TimestampTz
col_ts(int row, int col)
{
	bool		isnull;
	Datum		d = col_datum(row, col, &isnull);

	return isnull ? 0 : DatumGetTimestampTz(d);
}

static char *
aad(const char *table, const char *column, int64 row)
{
	return psprintf("digime/%s/%s/" INT64_FORMAT, table, column, row);
}

static char *
open_col(int row, int col, const char *table, const char *column, int64 id)
{
	char	   *stored = col_text(row, col);

	return stored ? dm_open(stored, aad(table, column, id)) : NULL;
}

static const char *
role_name(Oid role)
{
	return GetUserNameFromId(role, false);
}

/* ---------------------------------------------------------------------
 * The extension
 * ---------------------------------------------------------------------
 */

/*
 * The extension owner.  Also checks that the installed extension is the
 * version this library implements (1.1 added tables the code needs).
 */
Oid
dm_store_extension_owner(void)
{
	Oid			nsp = get_namespace_oid("digime", true);
	Oid			rel = OidIsValid(nsp) ? get_relname_relid("contracts", nsp) : InvalidOid;
	HeapTuple	tup;
	Oid			owner;

	if (!OidIsValid(rel))
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("extension digime is not installed in this database")));
	if (!OidIsValid(get_relname_relid("audit_log", nsp)))
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("extension digime must be updated to version %s", DIGIME_VERSION),
				 errdetail("The installed library is version %s; the database has an older version of the extension.",
						   DIGIME_VERSION),
				 errhint("Run ALTER EXTENSION digime UPDATE.")));
	tup = SearchSysCache1(RELOID, ObjectIdGetDatum(rel));
	if (!HeapTupleIsValid(tup))
		elog(ERROR, "cache lookup failed for relation %u", rel);
	owner = ((Form_pg_class) GETSTRUCT(tup))->relowner;
	ReleaseSysCache(tup);
	return owner;
}

/* ---------------------------------------------------------------------
 * Contracts
 * ---------------------------------------------------------------------
 */

STMT(st_contract_load,
	 "SELECT c.application_id, c.private_key, "
	 "  $4 OR EXISTS (SELECT 1 FROM digime.contract_grants g "
	 "          WHERE g.contract_id OPERATOR(pg_catalog.=) c.contract_id "
	 "            AND pg_catalog.pg_has_role($2, g.grantee::pg_catalog.oid, 'USAGE')) "
	 "FROM digime.contracts c WHERE c.contract_id OPERATOR(pg_catalog.=) $1",
	 TEXTOID, OIDOID, TEXTOID, BOOLOID);

void
dm_store_contract_load(const DmActor *a, const char *contract_id, DmContract *out,
					   MemoryContext key_owner)
{
	Params		p;
	bool		isnull;

	p_init(&p);
	p_text(&p, contract_id);
	p_actor(&p, a);
	if (run(&st_contract_load, &p, DM_READ_CURRENT, SPI_OK_SELECT) != 1 ||
		!DatumGetBool(col_datum(0, 3, &isnull)))
	{
		if (a->is_admin)
			ereport(ERROR,
					(errcode(ERRCODE_UNDEFINED_OBJECT),
					 errmsg("digi.me contract \"%s\" does not exist", contract_id)));
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("permission denied for digi.me contract \"%s\"", contract_id),
				 errdetail("The contract does not exist or is not granted to role \"%s\".",
						   role_name(a->role)),
				 errhint("An administrator grants it with digime_grant_contract().")));
	}
	if (out == NULL)
		return;
	memset(out, 0, sizeof(*out));
	out->contract_id = pstrdup(contract_id);
	out->application_id = col_text(0, 1);
	out->key = dm_contract_key(contract_id, col_text(0, 2), key_owner);
}

STMT(st_contract_add,
	 "INSERT INTO digime.contracts (contract_id, application_id, private_key, key_bits, "
	 "  key_fingerprint) VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
	 TEXTOID, TEXTOID, TEXTOID, INT4OID, TEXTOID);

void
dm_store_contract_add(const char *contract_id, const char *application_id,
					  const char *sealed_key, int bits, const char *fingerprint)
{
	Params		p;

	p_init(&p);
	p_text(&p, contract_id);
	p_text(&p, application_id);
	p_text(&p, sealed_key);
	p_datum(&p, Int32GetDatum(bits));
	p_text(&p, fingerprint);
	if (run(&st_contract_add, &p, DM_READ_CURRENT, SPI_OK_INSERT) == 0)
		ereport(ERROR,
				(errcode(ERRCODE_UNIQUE_VIOLATION),
				 errmsg("digi.me contract \"%s\" already exists", contract_id),
				 errhint("Use digime_rotate_contract_key() to replace its key.")));
}

static void
no_such_contract(const char *contract_id)
{
	ereport(ERROR,
			(errcode(ERRCODE_UNDEFINED_OBJECT),
			 errmsg("digi.me contract \"%s\" does not exist", contract_id)));
}

STMT(st_contract_rotate,
	 "UPDATE digime.contracts SET private_key = $2, key_bits = $3, key_fingerprint = $4, "
	 "  rotated_at = pg_catalog.now() WHERE contract_id OPERATOR(pg_catalog.=) $1",
	 TEXTOID, TEXTOID, INT4OID, TEXTOID);

void
dm_store_contract_rotate(const char *contract_id, const char *sealed_key, int bits,
						 const char *fingerprint)
{
	Params		p;

	p_init(&p);
	p_text(&p, contract_id);
	p_text(&p, sealed_key);
	p_datum(&p, Int32GetDatum(bits));
	p_text(&p, fingerprint);
	if (run(&st_contract_rotate, &p, DM_READ_CURRENT, SPI_OK_UPDATE) == 0)
		no_such_contract(contract_id);
}

STMT(st_contract_lock,
	 "SELECT 1 FROM digime.contracts WHERE contract_id OPERATOR(pg_catalog.=) $1 FOR UPDATE",
	 TEXTOID);
STMT(st_contract_tokens,
	 "SELECT count(*) FROM digime.user_tokens WHERE contract_id OPERATOR(pg_catalog.=) $1",
	 TEXTOID);
STMT(st_contract_grantees,
	 "SELECT grantee::pg_catalog.oid FROM digime.contract_grants "
	 "WHERE contract_id OPERATOR(pg_catalog.=) $1",
	 TEXTOID);
STMT(st_contract_delete_tokens,
	 "DELETE FROM digime.user_tokens WHERE contract_id OPERATOR(pg_catalog.=) $1",
	 TEXTOID);
STMT(st_contract_delete,
	 "DELETE FROM digime.contracts WHERE contract_id OPERATOR(pg_catalog.=) $1",
	 TEXTOID);

static void
contract_lock(const char *contract_id)
{
	Params		p;

	p_init(&p);
	p_text(&p, contract_id);
	if (run(&st_contract_lock, &p, DM_READ_CURRENT, SPI_OK_SELECT) != 1)
		no_such_contract(contract_id);
}

List *
dm_store_contract_drop(const char *contract_id, bool cascade)
{
	Params		p;
	int64		ntokens;
	List	   *grantees = NIL;
	uint64		n;

	contract_lock(contract_id);
	p_init(&p);
	p_text(&p, contract_id);
	run(&st_contract_tokens, &p, DM_READ_CURRENT, SPI_OK_SELECT);
	ntokens = col_int8(0, 1);
	if (ntokens > 0 && !cascade)
		ereport(ERROR,
				(errcode(ERRCODE_DEPENDENT_OBJECTS_STILL_EXIST),
				 errmsg("cannot drop digi.me contract \"%s\" because user access tokens use it",
						contract_id),
				 errdetail_plural("%lld user access token uses it.",
								  "%lld user access tokens use it.",
								  ntokens, (long long) ntokens),
				 errhint("Call digime_drop_contract(contract_id, cascade => true) to delete them too.")));
	n = run(&st_contract_grantees, &p, DM_READ_CURRENT, SPI_OK_SELECT);
	for (uint64 i = 0; i < n; i++)
	{
		bool		isnull;

		grantees = lappend_oid(grantees, DatumGetObjectId(col_datum(i, 1, &isnull)));
	}
	run(&st_contract_delete_tokens, &p, DM_READ_CURRENT, SPI_OK_DELETE);
	run(&st_contract_delete, &p, DM_READ_CURRENT, SPI_OK_DELETE);
	return grantees;
}

STMT(st_grant_add,
	 "INSERT INTO digime.contract_grants (contract_id, grantee) "
	 "VALUES ($1, $2::pg_catalog.regrole) ON CONFLICT DO NOTHING",
	 TEXTOID, OIDOID);
STMT(st_grant_remove,
	 "DELETE FROM digime.contract_grants WHERE contract_id OPERATOR(pg_catalog.=) $1 "
	 "  AND grantee OPERATOR(pg_catalog.=) $2::pg_catalog.regrole",
	 TEXTOID, OIDOID);
STMT(st_role_has_grants,
	 "SELECT 1 FROM digime.contract_grants "
	 "WHERE grantee OPERATOR(pg_catalog.=) $1::pg_catalog.regrole LIMIT 1",
	 OIDOID);
STMT(st_role_privileges,
	 "SELECT digime._role_privileges($1::pg_catalog.regrole, $2)",
	 OIDOID, BOOLOID);

void
dm_store_grant_add(const char *contract_id, Oid role)
{
	Params		p;

	contract_lock(contract_id);
	p_init(&p);
	p_text(&p, contract_id);
	p_datum(&p, ObjectIdGetDatum(role));
	run(&st_grant_add, &p, DM_READ_CURRENT, SPI_OK_INSERT);
}

void
dm_store_grant_remove(const char *contract_id, Oid role)
{
	Params		p;

	p_init(&p);
	p_text(&p, contract_id);
	p_datum(&p, ObjectIdGetDatum(role));
	if (run(&st_grant_remove, &p, DM_READ_CURRENT, SPI_OK_DELETE) == 0)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("role \"%s\" has no grant on digi.me contract \"%s\"",
						role_name(role), contract_id)));
}

bool
dm_store_role_has_grants(Oid role)
{
	Params		p;

	p_init(&p);
	p_datum(&p, ObjectIdGetDatum(role));
	return run(&st_role_has_grants, &p, DM_READ_CURRENT, SPI_OK_SELECT) > 0;
}

void
dm_store_role_privileges(Oid role, bool grant)
{
	Params		p;

	p_init(&p);
	p_datum(&p, ObjectIdGetDatum(role));
	p_datum(&p, BoolGetDatum(grant));
	run(&st_role_privileges, &p, DM_READ_CURRENT, SPI_OK_SELECT);
}

STMT(st_contract_info,
	 "SELECT * FROM digime.contracts_info WHERE contract_id OPERATOR(pg_catalog.=) $1",
	 TEXTOID);

void
dm_store_contract_info(const char *contract_id)
{
	Params		p;

	p_init(&p);
	p_text(&p, contract_id);
	if (run(&st_contract_info, &p, DM_READ_CURRENT, SPI_OK_SELECT) != 1)
		no_such_contract(contract_id);
}

/*
 * Rewrites the secret column of every row of table whose value is not
 * sealed with the current key.  key_col is the row key bound into the
 * associated data.  (Administration: a scan of the table is its purpose.)
 */
static uint64
reencrypt_column(const char *table, const char *key_col, const char *col)
{
	SPITupleTable *rows;
	uint64		nrows;
	uint64		changed = 0;

	if (SPI_execute(psprintf("SELECT %s::pg_catalog.text, %s FROM digime.%s "
							 "WHERE %s IS NOT NULL FOR UPDATE",
							 key_col, col, table, col), false, 0) != SPI_OK_SELECT)
		elog(ERROR, "could not read digime.%s", table);
	rows = SPI_tuptable;
	nrows = SPI_processed;
	for (uint64 i = 0; i < nrows; i++)
	{
		char	   *key = SPI_getvalue(rows->vals[i], rows->tupdesc, 1);
		char	   *stored = SPI_getvalue(rows->vals[i], rows->tupdesc, 2);
		char	   *aad_s;
		char	   *plain;
		Oid			types[2] = {TEXTOID, TEXTOID};
		Datum		values[2];

		if (dm_sealed_current(stored))
			continue;
		aad_s = psprintf("digime/%s/%s/%s", table, col, key);
		plain = dm_open(stored, aad_s);
		values[0] = CStringGetTextDatum(key);
		values[1] = CStringGetTextDatum(dm_seal(plain, aad_s));
		dm_secret_free(plain);
		if (SPI_execute_with_args(psprintf("UPDATE digime.%s SET %s = $2 "
										   "WHERE %s::pg_catalog.text OPERATOR(pg_catalog.=) $1",
										   table, col, key_col),
								  2, types, values, NULL, false, 0) != SPI_OK_UPDATE)
			elog(ERROR, "could not update digime.%s", table);
		changed++;
	}
	return changed;
}

uint64
dm_store_reencrypt_secrets(void)
{
	return reencrypt_column("contracts", "contract_id", "private_key") +
		reencrypt_column("user_tokens", "id", "access_token") +
		reencrypt_column("user_tokens", "id", "refresh_token") +
		reencrypt_column("authorizations", "id", "code_verifier");
}

/* ---------------------------------------------------------------------
 * User access tokens
 * ---------------------------------------------------------------------
 */

STMT(st_token_load,
	 "SELECT contract_id, access_token, refresh_token, access_token_expires_at, "
	 "  refresh_token_expires_at, user_id, consent_id, xmin, owner_role::pg_catalog.oid, "
	 "  end_user, status, next_refresh_at "
	 "FROM digime.user_tokens WHERE id OPERATOR(pg_catalog.=) $1 AND " ACTOR_ROWS,
	 INT8OID, OIDOID, TEXTOID, BOOLOID);

bool
dm_store_token_load(const DmActor *a, int64 token_id, bool with_secrets, DmRead read,
					bool missing_ok, DmStoredToken *out)
{
	Params		p;
	bool		isnull;

	p_init(&p);
	p_int8(&p, token_id);
	p_actor(&p, a);
	if (run(&st_token_load, &p, read, SPI_OK_SELECT) != 1)
	{
		if (missing_ok)
			return false;
		if (a->is_admin)
			ereport(ERROR,
					(errcode(ERRCODE_UNDEFINED_OBJECT),
					 errmsg("user access token " INT64_FORMAT " does not exist", token_id)));
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("permission denied for user access token " INT64_FORMAT, token_id),
				 errdetail("The token does not exist or is not owned by role \"%s\"%s.",
						   role_name(a->role),
						   a->end_user ? " and the current digime.end_user" : "")));
	}
	memset(out, 0, sizeof(*out));
	out->id = token_id;
	out->contract_id = col_text(0, 1);
	if (with_secrets)
	{
		out->access_token = open_col(0, 2, "user_tokens", "access_token", token_id);
		out->refresh_token = open_col(0, 3, "user_tokens", "refresh_token", token_id);
	}
	out->access_expires_at = col_ts(0, 4);
	out->refresh_expires_at = col_ts(0, 5);
	out->user_id = col_text(0, 6);
	out->consent_id = col_text(0, 7);
	out->changed_here =
		TransactionIdIsCurrentTransactionId(DatumGetTransactionId(col_datum(0, 8, &isnull)));
	out->owner_role = DatumGetObjectId(col_datum(0, 9, &isnull));
	out->end_user = col_text(0, 10);
	out->status = col_text(0, 11);
	out->next_refresh_at = col_ts(0, 12);
	return true;
}

STMT(st_token_lock,
	 "SELECT 1 FROM digime.user_tokens WHERE id OPERATOR(pg_catalog.=) $1 FOR NO KEY UPDATE",
	 INT8OID);

bool
dm_store_token_lock(int64 token_id)
{
	Params		p;

	p_init(&p);
	p_int8(&p, token_id);
	return run(&st_token_lock, &p, DM_READ_CURRENT, SPI_OK_SELECT) == 1;
}

STMT0(st_token_nextval, "SELECT pg_catalog.nextval('digime.user_tokens_id_seq')");
STMT(st_token_insert,
	 "INSERT INTO digime.user_tokens (id, access_token, access_token_expires_at, "
	 "  refresh_token, refresh_token_expires_at, user_id, consent_id, contract_id, "
	 "  owner_role, state, account_reference, end_user) "
	 "VALUES ($1, $2, pg_catalog.to_timestamp($3), $4, pg_catalog.to_timestamp($5), $6, $7, $8, "
	 "  $9::pg_catalog.regrole, $10, $11, $12)",
	 INT8OID, TEXTOID, FLOAT8OID, TEXTOID, FLOAT8OID, TEXTOID, TEXTOID, TEXTOID, OIDOID,
	 TEXTOID, TEXTOID, TEXTOID);

/* Parameters 1..7 of token insert and update: id, sealed pair, ids. */
static void
p_token(Params *p, int64 id, const DmUserToken *t)
{
	p_int8(p, id);
	p_text(p, dm_seal(t->access_token, aad("user_tokens", "access_token", id)));
	p_datum(p, Float8GetDatum((double) t->access_expires));
	p_text(p, dm_seal(t->refresh_token, aad("user_tokens", "refresh_token", id)));
	p_datum(p, Float8GetDatum((double) t->refresh_expires));
	p_text(p, t->user_id);
	p_text(p, t->consent_id);
}

int64
dm_store_token_insert(const DmActor *a, const char *contract_id, const DmUserToken *t,
					  const char *state, const char *account_reference)
{
	Params		p;
	int64		id;

	run(&st_token_nextval, NULL, DM_READ_CURRENT, SPI_OK_SELECT);
	id = col_int8(0, 1);
	p_init(&p);
	p_token(&p, id, t);
	p_text(&p, contract_id);
	p_datum(&p, ObjectIdGetDatum(a->role));
	p_text(&p, state);
	p_text(&p, account_reference);
	p_text(&p, a->end_user);
	run(&st_token_insert, &p, DM_READ_CURRENT, SPI_OK_INSERT);
	return id;
}

STMT(st_token_update,
	 "UPDATE digime.user_tokens SET "
	 "  access_token = $2, access_token_expires_at = pg_catalog.to_timestamp($3), "
	 "  refresh_token = $4, refresh_token_expires_at = pg_catalog.to_timestamp($5), "
	 "  user_id = COALESCE($6, user_id), consent_id = COALESCE($7, consent_id), "
	 "  account_reference = COALESCE($8, account_reference), "
	 "  updated_at = pg_catalog.now(), "
	 "  refreshed_at = CASE WHEN $9 THEN pg_catalog.now() ELSE refreshed_at END, "
	 "  status = 'active', refresh_failures = 0, next_refresh_at = NULL "
	 "WHERE id OPERATOR(pg_catalog.=) $1",
	 INT8OID, TEXTOID, FLOAT8OID, TEXTOID, FLOAT8OID, TEXTOID, TEXTOID, TEXTOID, BOOLOID);

bool
dm_store_token_update(int64 token_id, const DmUserToken *t, bool refreshed,
					  const char *account_reference)
{
	Params		p;

	p_init(&p);
	p_token(&p, token_id, t);
	p_text(&p, account_reference);
	p_datum(&p, BoolGetDatum(refreshed));
	return run(&st_token_update, &p, DM_READ_CURRENT, SPI_OK_UPDATE) == 1;
}

STMT(st_token_failed,
	 "UPDATE digime.user_tokens SET "
	 "  status = CASE WHEN $2 THEN 'needs_reauthorization' ELSE status END, "
	 "  refresh_failures = refresh_failures OPERATOR(pg_catalog.+) CASE WHEN $2 THEN 0 ELSE 1 END, "
	 "  next_refresh_at = CASE WHEN $2 THEN NULL ELSE pg_catalog.now() OPERATOR(pg_catalog.+) "
	 "    pg_catalog.make_interval(secs => LEAST(30 OPERATOR(pg_catalog.*) "
	 "      2.0 OPERATOR(pg_catalog.^) LEAST(refresh_failures, 7), 3600)) END, "
	 "  last_error_sqlstate = $3, last_error = $4, last_error_at = pg_catalog.clock_timestamp() "
	 "WHERE id OPERATOR(pg_catalog.=) $1 AND status OPERATOR(pg_catalog.<>) 'revoked'",
	 INT8OID, BOOLOID, TEXTOID, TEXTOID);

void
dm_store_token_failed(int64 token_id, bool needs_reauthorization, const char *sqlstate,
					  const char *message)
{
	Params		p;

	p_init(&p);
	p_int8(&p, token_id);
	p_datum(&p, BoolGetDatum(needs_reauthorization));
	p_text(&p, sqlstate);
	p_text(&p, message);
	run(&st_token_failed, &p, DM_READ_CURRENT, SPI_OK_UPDATE);
}

STMT(st_token_revoke,
	 "UPDATE digime.user_tokens SET status = 'revoked', access_token = NULL, "
	 "  refresh_token = NULL, updated_at = pg_catalog.now(), next_refresh_at = NULL "
	 "WHERE id OPERATOR(pg_catalog.=) $1 AND status OPERATOR(pg_catalog.<>) 'revoked'",
	 INT8OID);

bool
dm_store_token_revoke(int64 token_id)
{
	Params		p;

	p_init(&p);
	p_int8(&p, token_id);
	return run(&st_token_revoke, &p, DM_READ_CURRENT, SPI_OK_UPDATE) == 1;
}

STMT(st_token_row,
	 "SELECT * FROM digime.user_tokens WHERE id OPERATOR(pg_catalog.=) $1",
	 INT8OID);

bool
dm_store_token_row(int64 token_id, DmRead read)
{
	Params		p;

	p_init(&p);
	p_int8(&p, token_id);
	return run(&st_token_row, &p, read, SPI_OK_SELECT) == 1;
}

/*
 * The actor's tokens expiring before $1; the index on
 * access_token_expires_at bounds the scan to them.
 */
STMT(st_tokens_expiring,
	 "SELECT id, status OPERATOR(pg_catalog.=) 'active' "
	 "  AND refresh_token_expires_at OPERATOR(pg_catalog.>) pg_catalog.now() "
	 "  AND (next_refresh_at IS NULL OR next_refresh_at OPERATOR(pg_catalog.<=) pg_catalog.now()) "
	 "FROM digime.user_tokens "
	 "WHERE access_token_expires_at OPERATOR(pg_catalog.<) $1 AND " ACTOR_ROWS " "
	 "ORDER BY access_token_expires_at",
	 TIMESTAMPTZOID, OIDOID, TEXTOID, BOOLOID);

List *
dm_store_tokens_expiring(const DmActor *a, int64 within_ms, int64 max_tokens, int64 *skipped)
{
	Params		p;
	List	   *ids = NIL;
	uint64		n;
	int64		nids = 0;

	p_init(&p);
	p_ts(&p, TimestampTzPlusMilliseconds(GetCurrentTimestamp(), within_ms));
	p_actor(&p, a);
	n = run(&st_tokens_expiring, &p, DM_READ_CURRENT, SPI_OK_SELECT);
	*skipped = 0;
	for (uint64 i = 0; i < n; i++)
	{
		bool		isnull;

		if (!DatumGetBool(col_datum(i, 2, &isnull)))
			(*skipped)++;
		else if (max_tokens < 0 || nids < max_tokens)
		{
			int64	   *id = palloc(sizeof(int64));

			*id = col_int8(i, 1);
			ids = lappend(ids, id);
			nids++;
		}
	}
	return ids;
}

/* ---------------------------------------------------------------------
 * Authorizations
 * ---------------------------------------------------------------------
 */

STMT(st_pending_supersede,
	 "UPDATE digime.authorizations SET status = 'superseded', code_verifier = NULL, "
	 "  finished_at = pg_catalog.now() "
	 "WHERE owner_role OPERATOR(pg_catalog.=) $1::pg_catalog.regrole "
	 "  AND state OPERATOR(pg_catalog.=) $2 AND end_user IS NOT DISTINCT FROM $3 "
	 "  AND status OPERATOR(pg_catalog.=) 'pending'",
	 OIDOID, TEXTOID, TEXTOID);
STMT0(st_pending_nextval, "SELECT pg_catalog.nextval('digime.authorizations_id_seq')");
STMT(st_pending_insert,
	 "INSERT INTO digime.authorizations (owner_role, state, end_user, id, kind, contract_id, "
	 "  code_verifier, session, callback, token_id, expires_at) "
	 "VALUES ($1::pg_catalog.regrole, $2, $3, $4, $5, $6, $7, $8, $9, $10, "
	 "  pg_catalog.now() OPERATOR(pg_catalog.+) pg_catalog.make_interval(secs => $11))",
	 OIDOID, TEXTOID, TEXTOID, INT8OID, TEXTOID, TEXTOID, TEXTOID, JSONBOID, TEXTOID, INT8OID,
	 FLOAT8OID);

int64
dm_store_pending_insert(const DmActor *a, const char *kind, const char *contract_id,
						const char *state, const char *code_verifier, Jsonb *session,
						const char *callback, int64 token_id, int ttl_s)
{
	Params		p;
	int64		id;

	p_init(&p);
	p_datum(&p, ObjectIdGetDatum(a->role));
	p_text(&p, state);
	p_text(&p, a->end_user);
	run(&st_pending_supersede, &p, DM_READ_CURRENT, SPI_OK_UPDATE);

	run(&st_pending_nextval, NULL, DM_READ_CURRENT, SPI_OK_SELECT);
	id = col_int8(0, 1);
	p_int8(&p, id);
	p_text(&p, kind);
	p_text(&p, contract_id);
	p_text(&p, dm_seal(code_verifier, aad("authorizations", "code_verifier", id)));
	p_datum(&p, JsonbPGetDatum(session));
	p_text(&p, callback);
	p_id(&p, token_id);
	p_datum(&p, Float8GetDatum((double) ttl_s));
	run(&st_pending_insert, &p, DM_READ_CURRENT, SPI_OK_INSERT);
	return id;
}

/*
 * $1 state, $2 role, $3 end user: through index authorizations_state; the
 * last column counts the pending ones (several end users of the role).
 */
STMT(st_authorization_find,
	 "SELECT id, kind, contract_id, code_verifier, token_id, status, "
	 "  status OPERATOR(pg_catalog.=) 'pending' "
	 "    AND expires_at OPERATOR(pg_catalog.<) pg_catalog.clock_timestamp(), code_hash, "
	 "  pg_catalog.count(*) FILTER (WHERE status OPERATOR(pg_catalog.=) 'pending') OVER () "
	 "FROM digime.authorizations "
	 "WHERE owner_role OPERATOR(pg_catalog.=) $2::pg_catalog.regrole "
	 "  AND state OPERATOR(pg_catalog.=) $1 "
	 "  AND ($3::pg_catalog.text IS NULL OR end_user OPERATOR(pg_catalog.=) $3) "
	 "ORDER BY status OPERATOR(pg_catalog.=) 'pending' DESC, created_at DESC, id DESC LIMIT 1",
	 TEXTOID, OIDOID, TEXTOID);

bool
dm_store_authorization_find(const DmActor *a, const char *state, DmPending *out)
{
	Params		p;

	p_init(&p);
	p_text(&p, state);
	p_datum(&p, ObjectIdGetDatum(a->role));
	p_text(&p, a->end_user);
	if (run(&st_authorization_find, &p, DM_READ_CURRENT, SPI_OK_SELECT) == 0)
		return false;

	/* pending for several end users: only digime.end_user can tell which */
	if (a->end_user == NULL)
	{
		if (col_int8(0, 9) > 1)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("the callback's state is pending for more than one end user of role \"%s\"",
							role_name(a->role)),
					 errhint("Set digime.end_user to the end user the callback belongs to, "
							 "or use states that are unique within the role.")));
	}
	memset(out, 0, sizeof(*out));
	out->id = col_int8(0, 1);
	out->kind = col_text(0, 2);
	out->contract_id = col_text(0, 3);
	out->code_verifier = open_col(0, 4, "authorizations", "code_verifier", out->id);
	out->token_id = col_int8(0, 5);
	out->status = col_text(0, 6);
	out->expired = strcmp(col_text(0, 7), "t") == 0;
	out->code_hash = col_text(0, 8);
	return true;
}

STMT(st_authorization_superseded,
	 "SELECT 1 FROM digime.authorizations "
	 "WHERE owner_role OPERATOR(pg_catalog.=) $2::pg_catalog.regrole "
	 "  AND state OPERATOR(pg_catalog.=) $1 AND status OPERATOR(pg_catalog.=) 'superseded' LIMIT 1",
	 TEXTOID, OIDOID);

bool
dm_store_authorization_superseded(const DmActor *a, const char *state)
{
	Params		p;

	p_init(&p);
	p_text(&p, state);
	p_datum(&p, ObjectIdGetDatum(a->role));
	return run(&st_authorization_superseded, &p, DM_READ_CURRENT, SPI_OK_SELECT) > 0;
}

STMT(st_authorization_complete,
	 "UPDATE digime.authorizations SET status = 'completed', code_verifier = NULL, "
	 "  completed_at = pg_catalog.now(), finished_at = pg_catalog.now(), token_id = $2, "
	 "  code_hash = $3 "
	 "WHERE id OPERATOR(pg_catalog.=) $1",
	 INT8OID, INT8OID, TEXTOID);

void
dm_store_authorization_complete(int64 id, int64 token_id, const char *code_hash)
{
	Params		p;

	p_init(&p);
	p_int8(&p, id);
	p_int8(&p, token_id);
	p_text(&p, code_hash);
	run(&st_authorization_complete, &p, DM_READ_CURRENT, SPI_OK_UPDATE);
}

STMT(st_authorization_expire,
	 "UPDATE digime.authorizations SET status = 'expired', code_verifier = NULL, "
	 "  finished_at = pg_catalog.now() "
	 "WHERE id OPERATOR(pg_catalog.=) $1 AND status OPERATOR(pg_catalog.=) 'pending'",
	 INT8OID);

void
dm_store_authorization_expire(int64 id)
{
	Params		p;

	p_init(&p);
	p_int8(&p, id);
	run(&st_authorization_expire, &p, DM_READ_CURRENT, SPI_OK_UPDATE);
}

/* ---------------------------------------------------------------------
 * Callback inbox
 * ---------------------------------------------------------------------
 */

/* uses index callback_inbox_due */
STMT(st_inbox_due,
	 "SELECT id, owner_role::pg_catalog.oid, end_user, callback_url, attempts "
	 "FROM digime.callback_inbox "
	 "WHERE status OPERATOR(pg_catalog.=) 'pending' "
	 "  AND next_attempt_at OPERATOR(pg_catalog.<=) pg_catalog.now() "
	 "  AND ($1 OPERATOR(pg_catalog.=) 0 OR owner_role OPERATOR(pg_catalog.=) $1::pg_catalog.regrole) "
	 "  AND id OPERATOR(pg_catalog.<>) ALL ($2) "
	 "ORDER BY next_attempt_at LIMIT $3",
	 OIDOID, INT8ARRAYOID, INT4OID);

List *
dm_store_inbox_due(Oid role, int limit, const List *exclude_ids)
{
	Params		p;
	List	   *rows = NIL;
	uint64		n;
	Datum	   *ids;
	int			nids = 0;
	ListCell   *lc;

	ids = palloc(sizeof(Datum) * (list_length(exclude_ids) + 1));
	foreach(lc, exclude_ids)
		ids[nids++] = Int64GetDatum(*(int64 *) lfirst(lc));
	p_init(&p);
	p_datum(&p, ObjectIdGetDatum(role));
	p_datum(&p, PointerGetDatum(construct_array(ids, nids, INT8OID, 8, FLOAT8PASSBYVAL,
												TYPALIGN_DOUBLE)));
	p_datum(&p, Int32GetDatum(limit));
	n = run(&st_inbox_due, &p, DM_READ_CURRENT, SPI_OK_SELECT);
	for (uint64 i = 0; i < n; i++)
	{
		DmInboxRow *r = palloc0(sizeof(DmInboxRow));
		bool		isnull;

		r->id = col_int8(i, 1);
		r->owner_role = DatumGetObjectId(col_datum(i, 2, &isnull));
		r->end_user = col_text(i, 3);
		r->callback_url = col_text(i, 4);
		r->attempts = DatumGetInt32(col_datum(i, 5, &isnull));
		rows = lappend(rows, r);
	}
	return rows;
}

STMT(st_inbox_insert,
	 "INSERT INTO digime.callback_inbox (owner_role, end_user, callback_url) "
	 "VALUES ($1::pg_catalog.regrole, $2, $3) RETURNING id",
	 OIDOID, TEXTOID, TEXTOID);

int64
dm_store_inbox_insert(Oid role, const char *end_user, const char *callback_url)
{
	Params		p;

	p_init(&p);
	p_datum(&p, ObjectIdGetDatum(role));
	p_text(&p, end_user);
	p_text(&p, callback_url);
	run(&st_inbox_insert, &p, DM_READ_CURRENT, SPI_OK_INSERT_RETURNING);
	return col_int8(0, 1);
}

STMT(st_inbox_finish,
	 "UPDATE digime.callback_inbox SET status = $2, token_id = $3, sqlstate = $4, message = $5, "
	 "  attempts = attempts OPERATOR(pg_catalog.+) 1, "
	 "  next_attempt_at = COALESCE($6, next_attempt_at), "
	 "  finished_at = CASE WHEN $2 OPERATOR(pg_catalog.=) 'pending' THEN NULL "
	 "                     ELSE pg_catalog.now() END, "
	 "  callback_url = $7 "
	 "WHERE id OPERATOR(pg_catalog.=) $1",
	 INT8OID, TEXTOID, INT8OID, TEXTOID, TEXTOID, TIMESTAMPTZOID, TEXTOID);

void
dm_store_inbox_finish(int64 id, const char *status, int64 token_id, const char *sqlstate,
					  const char *message, TimestampTz retry_at, const char *callback_url)
{
	Params		p;

	p_init(&p);
	p_int8(&p, id);
	p_text(&p, status);
	p_id(&p, token_id);
	p_text(&p, sqlstate);
	p_text(&p, message);
	p_ts(&p, retry_at);
	p_text(&p, callback_url);
	run(&st_inbox_finish, &p, DM_READ_CURRENT, SPI_OK_UPDATE);
}

/* ---------------------------------------------------------------------
 * Audit trail, retention, notifications
 * ---------------------------------------------------------------------
 */

STMT(st_audit,
	 "INSERT INTO digime.audit_log (role, action, contract_id, token_id, outcome, sqlstate, "
	 "  reference) VALUES ($1::pg_catalog.regrole, $2, $3, $4, $5, $6, $7)",
	 OIDOID, TEXTOID, TEXTOID, INT8OID, TEXTOID, TEXTOID, TEXTOID);

void
dm_store_audit(const DmAudit *audit)
{
	Params		p;

	p_init(&p);
	p_datum(&p, ObjectIdGetDatum(audit->role));
	p_text(&p, audit->action);
	p_text(&p, audit->contract_id);
	p_id(&p, audit->token_id);
	p_text(&p, audit->ok ? "ok" : "error");
	p_text(&p, audit->ok ? NULL : audit->sqlstate);
	p_text(&p, audit->reference);
	run(&st_audit, &p, DM_READ_CURRENT, SPI_OK_INSERT);
}

/*
 * Retention statements: each takes at most $2 rows through a partial index
 * on the time column ($1 = cut-off), then the rows by primary key (= ANY of
 * an array: with IN, a generic plan joins against the whole table), so no
 * round reads a whole table.
 */
STMT(st_purge_expire,
	 "UPDATE digime.authorizations SET status = 'expired', code_verifier = NULL, "
	 "  finished_at = pg_catalog.now() "
	 "WHERE id OPERATOR(pg_catalog.=) ANY (ARRAY(SELECT id FROM digime.authorizations "
	 "  WHERE status OPERATOR(pg_catalog.=) 'pending' AND expires_at OPERATOR(pg_catalog.<) $1 "
	 "  ORDER BY expires_at LIMIT $2 FOR UPDATE SKIP LOCKED))",
	 TIMESTAMPTZOID, INT4OID);
STMT(st_purge_authorizations,
	 "DELETE FROM digime.authorizations WHERE id OPERATOR(pg_catalog.=) ANY (ARRAY(SELECT id "
	 "  FROM digime.authorizations "
	 "  WHERE status OPERATOR(pg_catalog.<>) 'pending' AND finished_at OPERATOR(pg_catalog.<) $1 "
	 "  ORDER BY finished_at LIMIT $2 FOR UPDATE SKIP LOCKED))",
	 TIMESTAMPTZOID, INT4OID);
STMT(st_purge_inbox,
	 "DELETE FROM digime.callback_inbox WHERE id OPERATOR(pg_catalog.=) ANY (ARRAY(SELECT id "
	 "  FROM digime.callback_inbox "
	 "  WHERE status OPERATOR(pg_catalog.<>) 'pending' AND finished_at OPERATOR(pg_catalog.<) $1 "
	 "  ORDER BY finished_at LIMIT $2 FOR UPDATE SKIP LOCKED))",
	 TIMESTAMPTZOID, INT4OID);
STMT(st_purge_tokens,
	 "DELETE FROM digime.user_tokens WHERE id OPERATOR(pg_catalog.=) ANY (ARRAY(SELECT id "
	 "  FROM digime.user_tokens "
	 "  WHERE status OPERATOR(pg_catalog.=) 'revoked' AND updated_at OPERATOR(pg_catalog.<) $1 "
	 "  ORDER BY updated_at LIMIT $2 FOR UPDATE SKIP LOCKED))",
	 TIMESTAMPTZOID, INT4OID);
STMT(st_purge_audit,
	 "DELETE FROM digime.audit_log WHERE id OPERATOR(pg_catalog.=) ANY (ARRAY(SELECT id "
	 "  FROM digime.audit_log WHERE at OPERATOR(pg_catalog.<) $1 ORDER BY at LIMIT $2))",
	 TIMESTAMPTZOID, INT4OID);

static uint64
purge_one(Stmt *st, int age_s, int limit, int expect, bool *more)
{
	Params		p;
	uint64		n;

	p_init(&p);
	p_ts(&p, TimestampTzPlusMilliseconds(GetCurrentTimestamp(), -(int64) age_s * 1000));
	p_datum(&p, Int32GetDatum(limit));
	n = run(st, &p, DM_READ_CURRENT, expect);
	if (n >= (uint64) limit)
		*more = true;
	return n;
}

uint64
dm_store_purge(int retention_s, int audit_retention_s, int limit, uint64 *expired, bool *more)
{
	uint64		deleted = 0;

	*more = false;
	*expired = purge_one(&st_purge_expire, 0, limit, SPI_OK_UPDATE, more);
	deleted += purge_one(&st_purge_authorizations, retention_s, limit, SPI_OK_DELETE, more);
	deleted += purge_one(&st_purge_inbox, retention_s, limit, SPI_OK_DELETE, more);
	deleted += purge_one(&st_purge_tokens, retention_s, limit, SPI_OK_DELETE, more);
	deleted += purge_one(&st_purge_audit, audit_retention_s, limit, SPI_OK_DELETE, more);
	return deleted;
}

STMT(st_notify, "SELECT pg_catalog.pg_notify('digime_token', $1)", TEXTOID);

void
dm_store_notify(const char *payload)
{
	Params		p;

	p_init(&p);
	p_text(&p, payload);
	run(&st_notify, &p, DM_READ_CURRENT, SPI_OK_SELECT);
}
