/*-------------------------------------------------------------------------
 *
 * admin.c
 *	  SQL-callable administration: contracts and their keys, grants of
 *	  contracts to roles, token revocation, re-encryption of secrets.
 *
 * EXECUTE on these functions is revoked from PUBLIC: the extension owner
 * and superusers run them, and may delegate them with GRANT EXECUTE.
 *
 * IDENTIFICATION
 *	  src/admin.c
 *
 *-------------------------------------------------------------------------
 */
#include "digime.h"

#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "utils/builtins.h"

PG_FUNCTION_INFO_V1(digime_add_contract);
PG_FUNCTION_INFO_V1(digime_rotate_contract_key);
PG_FUNCTION_INFO_V1(digime_drop_contract);
PG_FUNCTION_INFO_V1(digime_grant_contract);
PG_FUNCTION_INFO_V1(digime_revoke_contract);
PG_FUNCTION_INFO_V1(digime_revoke_token);
PG_FUNCTION_INFO_V1(digime_reencrypt_secrets);
PG_FUNCTION_INFO_V1(digime_encryption_key_id);

/* What digime_grant_contract gives a role; revoked with its last grant. */
static const char *const role_privileges[] = {
	"USAGE ON SCHEMA digime",
	"EXECUTE ON FUNCTION "
	"digime.digime_authorize_url(text, text, text, integer, bigint, jsonb, text, jsonb, text, boolean, text, boolean, jsonb), "
	"digime.digime_exchange_code(text, text, text), "
	"digime.digime_handle_callback(text), "
	"digime.digime_refresh_token(bigint), "
	"digime.digime_reauthorize_url(bigint, text, text, text, jsonb, boolean), "
	"digime.digime_user_access_token(bigint), "
	"digime.digime_import_token(text, jsonb)",
	"SELECT (id, contract_id, owner_role, end_user, user_id, consent_id, "
	"access_token_expires_at, refresh_token_expires_at, state, account_reference, "
	"created_at, updated_at, refreshed_at), DELETE ON digime.user_tokens",
	"SELECT (id, kind, contract_id, owner_role, end_user, state, session, callback, "
	"token_id, status, created_at, expires_at, completed_at) ON digime.authorizations",
	"SELECT ON digime.user_tokens_info, digime.contracts_info",
	NULL
};

/* A validated key: its sealed PEM (for contract_id), size and fingerprint. */
typedef struct ContractKey
{
	char	   *sealed;
	int			bits;
	char	   *fingerprint;
} ContractKey;

static void
contract_key_arg(FunctionCallInfo fcinfo, int argno, const char *contract_id, ContractKey *out)
{
	char	   *pem = dm_arg_text(fcinfo, argno, "private_key");
	const char *why;
	EVP_PKEY   *key = dm_private_key_parse(pem, &why);

	if (key == NULL)
	{
		dm_secret_free(pem);
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("invalid private key for digi.me contract \"%s\"", contract_id),
				 errdetail("%s", why)));
	}
	out->bits = EVP_PKEY_get_bits(key);
	out->fingerprint = dm_key_fingerprint(key);
	EVP_PKEY_free(key);
	if (out->fingerprint == NULL)
		elog(ERROR, "could not compute the public key fingerprint");
	out->sealed = dm_seal(pem, psprintf("digime/contracts/private_key/%s", contract_id));
	dm_secret_free(pem);
}

static Datum
contract_info(DmCall *call, const char *contract_id)
{
	Oid			types[1] = {TEXTOID};
	Datum		values[1] = {CStringGetTextDatum(contract_id)};

	return dm_row_result(call, "SELECT * FROM digime.contracts_info "
						 "WHERE contract_id OPERATOR(pg_catalog.=) $1",
						 1, types, values, NULL);
}

static void
exec(const char *sql, int expect)
{
	if (SPI_execute(sql, false, 0) != expect)
		elog(ERROR, "SPI_execute failed: %s", sql);
}

static void
no_such_contract(const char *contract_id)
{
	ereport(ERROR,
			(errcode(ERRCODE_UNDEFINED_OBJECT),
			 errmsg("digi.me contract \"%s\" does not exist", contract_id)));
}

Datum
digime_add_contract(PG_FUNCTION_ARGS)
{
	char	   *contract_id = dm_arg_text(fcinfo, 0, "contract_id");
	char	   *application_id = dm_arg_text(fcinfo, 1, "application_id");
	ContractKey key;
	DmCall		call;
	Oid			types[5] = {TEXTOID, TEXTOID, TEXTOID, INT4OID, TEXTOID};
	Datum		values[5];
	Datum		result;

	dm_validate_id("contract_id", contract_id);
	dm_validate_id("application_id", application_id);
	contract_key_arg(fcinfo, 2, contract_id, &key);
	values[0] = CStringGetTextDatum(contract_id);
	values[1] = CStringGetTextDatum(application_id);
	values[2] = CStringGetTextDatum(key.sealed);
	values[3] = Int32GetDatum(key.bits);
	values[4] = CStringGetTextDatum(key.fingerprint);

	dm_call_begin(&call, fcinfo);
	if (SPI_execute_with_args("INSERT INTO digime.contracts (contract_id, application_id, "
							  "  private_key, key_bits, key_fingerprint) VALUES ($1, $2, $3, $4, $5) "
							  "ON CONFLICT DO NOTHING",
							  5, types, values, NULL, false, 0) != SPI_OK_INSERT)
		elog(ERROR, "could not insert the contract");
	if (SPI_processed == 0)
		ereport(ERROR,
				(errcode(ERRCODE_UNIQUE_VIOLATION),
				 errmsg("digi.me contract \"%s\" already exists", contract_id),
				 errhint("Use digime_rotate_contract_key() to replace its key.")));
	result = contract_info(&call, contract_id);
	dm_call_end(&call);
	dm_secret_free(key.sealed);
	PG_RETURN_DATUM(result);
}

Datum
digime_rotate_contract_key(PG_FUNCTION_ARGS)
{
	char	   *contract_id = dm_arg_text(fcinfo, 0, "contract_id");
	ContractKey key;
	DmCall		call;
	Oid			types[4] = {TEXTOID, TEXTOID, INT4OID, TEXTOID};
	Datum		values[4];
	Datum		result;

	contract_key_arg(fcinfo, 1, contract_id, &key);
	values[0] = CStringGetTextDatum(contract_id);
	values[1] = CStringGetTextDatum(key.sealed);
	values[2] = Int32GetDatum(key.bits);
	values[3] = CStringGetTextDatum(key.fingerprint);

	dm_call_begin(&call, fcinfo);
	if (SPI_execute_with_args("UPDATE digime.contracts SET private_key = $2, key_bits = $3, "
							  "  key_fingerprint = $4, rotated_at = pg_catalog.now() "
							  "WHERE contract_id OPERATOR(pg_catalog.=) $1",
							  4, types, values, NULL, false, 0) != SPI_OK_UPDATE)
		elog(ERROR, "could not update the contract");
	if (SPI_processed == 0)
		no_such_contract(contract_id);
	result = contract_info(&call, contract_id);
	dm_call_end(&call);
	dm_secret_free(key.sealed);
	PG_RETURN_DATUM(result);
}

static void
grant_role(Oid role)
{
	const char *name = quote_identifier(GetUserNameFromId(role, false));

	for (const char *const *p = role_privileges; *p; p++)
		exec(psprintf("GRANT %s TO %s", *p, name), SPI_OK_UTILITY);
}

/* Revokes role_privileges from a role that no longer has any grant. */
static void
revoke_role_if_unused(Oid role)
{
	Oid			types[1] = {OIDOID};
	Datum		values[1] = {ObjectIdGetDatum(role)};
	const char *name;

	if (SPI_execute_with_args("SELECT 1 FROM digime.contract_grants "
							  "WHERE grantee OPERATOR(pg_catalog.=) $1::pg_catalog.regrole LIMIT 1",
							  1, types, values, NULL, false, 0) != SPI_OK_SELECT)
		elog(ERROR, "could not read the contract grants");
	if (SPI_processed > 0)
		return;
	name = quote_identifier(GetUserNameFromId(role, false));
	for (const char *const *p = role_privileges; *p; p++)
		exec(psprintf("REVOKE %s FROM %s", *p, name), SPI_OK_UTILITY);
}

static bool
contract_exists(const char *contract_id)
{
	Oid			types[1] = {TEXTOID};
	Datum		values[1] = {CStringGetTextDatum(contract_id)};

	if (SPI_execute_with_args("SELECT 1 FROM digime.contracts "
							  "WHERE contract_id OPERATOR(pg_catalog.=) $1 FOR UPDATE",
							  1, types, values, NULL, false, 0) != SPI_OK_SELECT)
		elog(ERROR, "could not read the contracts");
	return SPI_processed == 1;
}

static Oid
role_arg(FunctionCallInfo fcinfo, int argno)
{
	if (PG_ARGISNULL(argno))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("role must not be NULL")));
	return PG_GETARG_OID(argno);
}

Datum
digime_drop_contract(PG_FUNCTION_ARGS)
{
	char	   *contract_id = dm_arg_text(fcinfo, 0, "contract_id");
	bool		cascade = !PG_ARGISNULL(1) && PG_GETARG_BOOL(1);
	DmCall		call;
	Oid			types[1] = {TEXTOID};
	Datum		values[1] = {CStringGetTextDatum(contract_id)};
	SPITupleTable *grantees;
	uint64		ngrantees;
	uint64		ntokens;
	bool		isnull;

	dm_call_begin(&call, fcinfo);
	if (!contract_exists(contract_id))
		no_such_contract(contract_id);
	if (SPI_execute_with_args("SELECT 1 FROM digime.user_tokens "
							  "WHERE contract_id OPERATOR(pg_catalog.=) $1 FOR UPDATE",
							  1, types, values, NULL, false, 0) != SPI_OK_SELECT)
		elog(ERROR, "could not read the user tokens");
	ntokens = SPI_processed;
	if (ntokens > 0 && !cascade)
		ereport(ERROR,
				(errcode(ERRCODE_DEPENDENT_OBJECTS_STILL_EXIST),
				 errmsg("cannot drop digi.me contract \"%s\" because user access tokens use it",
						contract_id),
				 errdetail_plural("%llu user access token uses it.",
								  "%llu user access tokens use it.",
								  ntokens, (unsigned long long) ntokens),
				 errhint("Call digime_drop_contract(contract_id, cascade => true) to delete them too.")));

	if (SPI_execute_with_args("SELECT grantee::pg_catalog.oid FROM digime.contract_grants "
							  "WHERE contract_id OPERATOR(pg_catalog.=) $1",
							  1, types, values, NULL, false, 0) != SPI_OK_SELECT)
		elog(ERROR, "could not read the contract grants");
	grantees = SPI_tuptable;
	ngrantees = SPI_processed;

	if (SPI_execute_with_args("DELETE FROM digime.user_tokens WHERE contract_id OPERATOR(pg_catalog.=) $1",
							  1, types, values, NULL, false, 0) != SPI_OK_DELETE ||
		SPI_execute_with_args("DELETE FROM digime.contracts WHERE contract_id OPERATOR(pg_catalog.=) $1",
							  1, types, values, NULL, false, 0) != SPI_OK_DELETE)
		elog(ERROR, "could not delete the contract");
	for (uint64 i = 0; i < ngrantees; i++)
		revoke_role_if_unused(DatumGetObjectId(SPI_getbinval(grantees->vals[i], grantees->tupdesc,
															 1, &isnull)));
	dm_call_end(&call);
	PG_RETURN_VOID();
}

Datum
digime_grant_contract(PG_FUNCTION_ARGS)
{
	char	   *contract_id = dm_arg_text(fcinfo, 0, "contract_id");
	Oid			role = role_arg(fcinfo, 1);
	DmCall		call;
	Oid			types[2] = {TEXTOID, OIDOID};
	Datum		values[2] = {CStringGetTextDatum(contract_id), ObjectIdGetDatum(role)};

	dm_call_begin(&call, fcinfo);
	if (!contract_exists(contract_id))
		no_such_contract(contract_id);
	if (SPI_execute_with_args("INSERT INTO digime.contract_grants (contract_id, grantee) "
							  "VALUES ($1, $2::pg_catalog.regrole) ON CONFLICT DO NOTHING",
							  2, types, values, NULL, false, 0) != SPI_OK_INSERT)
		elog(ERROR, "could not insert the grant");
	grant_role(role);
	dm_call_end(&call);
	PG_RETURN_VOID();
}

Datum
digime_revoke_contract(PG_FUNCTION_ARGS)
{
	char	   *contract_id = dm_arg_text(fcinfo, 0, "contract_id");
	Oid			role = role_arg(fcinfo, 1);
	DmCall		call;
	Oid			types[2] = {TEXTOID, OIDOID};
	Datum		values[2] = {CStringGetTextDatum(contract_id), ObjectIdGetDatum(role)};

	dm_call_begin(&call, fcinfo);
	if (SPI_execute_with_args("DELETE FROM digime.contract_grants "
							  "WHERE contract_id OPERATOR(pg_catalog.=) $1 "
							  "  AND grantee OPERATOR(pg_catalog.=) $2::pg_catalog.regrole",
							  2, types, values, NULL, false, 0) != SPI_OK_DELETE)
		elog(ERROR, "could not delete the grant");
	if (SPI_processed == 0)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("role \"%s\" has no grant on digi.me contract \"%s\"",
						GetUserNameFromId(role, false), contract_id)));
	revoke_role_if_unused(role);
	dm_call_end(&call);
	PG_RETURN_VOID();
}

Datum
digime_revoke_token(PG_FUNCTION_ARGS)
{
	DmCall		call;
	Oid			types[1] = {INT8OID};
	Datum		values[1] = {PG_GETARG_DATUM(0)};
	bool		found;

	dm_call_begin(&call, fcinfo);
	if (SPI_execute_with_args("DELETE FROM digime.user_tokens WHERE id OPERATOR(pg_catalog.=) $1",
							  1, types, values, NULL, false, 0) != SPI_OK_DELETE)
		elog(ERROR, "could not delete the token");
	found = SPI_processed > 0;
	dm_call_end(&call);
	PG_RETURN_BOOL(found);
}

/*
 * Rewrites the secret column of every row of table whose value is not
 * sealed with the current key.  key_col is the row key bound into the
 * associated data.
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
		char	   *aad;
		char	   *plain;
		Oid			types[2] = {TEXTOID, TEXTOID};
		Datum		values[2];

		if (dm_sealed_current(stored))
			continue;
		aad = psprintf("digime/%s/%s/%s", table, col, key);
		plain = dm_open(stored, aad);
		values[0] = CStringGetTextDatum(key);
		values[1] = CStringGetTextDatum(dm_seal(plain, aad));
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

Datum
digime_reencrypt_secrets(PG_FUNCTION_ARGS)
{
	DmCall		call;
	uint64		n = 0;

	dm_call_begin(&call, fcinfo);
	(void) dm_crypt_enabled();	/* refuses when the key file could not be loaded */
	n += reencrypt_column("contracts", "contract_id", "private_key");
	n += reencrypt_column("user_tokens", "id", "access_token");
	n += reencrypt_column("user_tokens", "id", "refresh_token");
	n += reencrypt_column("authorizations", "id", "code_verifier");
	dm_call_end(&call);
	PG_RETURN_INT64((int64) n);
}

Datum
digime_encryption_key_id(PG_FUNCTION_ARGS)
{
	if (!dm_crypt_enabled())
		PG_RETURN_NULL();
	PG_RETURN_TEXT_P(cstring_to_text(dm_crypt_key_id()));
}
