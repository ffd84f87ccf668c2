/*-------------------------------------------------------------------------
 *
 * admin.c
 *	  SQL-callable administration: contracts and their keys, grants of
 *	  contracts to roles, token revocation, re-encryption of secrets.
 *
 * EXECUTE on these functions is revoked from PUBLIC: the extension owner
 * and superusers run them, and may delegate them with GRANT EXECUTE.  The
 * privileges a grant gives are listed in the versioned SQL
 * (digime._role_privileges).
 *
 * IDENTIFICATION
 *	  src/admin.c
 *
 *-------------------------------------------------------------------------
 */
#include "digime.h"

#include "call.h"
#include "crypt.h"
#include "jose.h"
#include "store.h"
#include "util.h"

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
add_contract_body(DmCall *call)
{
	FunctionCallInfo fcinfo = call->fcinfo;
	char	   *contract_id = dm_arg_text(fcinfo, 0, "contract_id");
	char	   *application_id = dm_arg_text(fcinfo, 1, "application_id");
	ContractKey key;
	Datum		result;

	call->audit.contract_id = contract_id;
	dm_validate_id("contract_id", contract_id);
	dm_validate_id("application_id", application_id);
	contract_key_arg(fcinfo, 2, contract_id, &key);
	dm_call_enter(call);
	dm_store_contract_add(contract_id, application_id, key.sealed, key.bits, key.fingerprint);
	dm_store_contract_info(contract_id);
	result = dm_call_result_row(call, NULL);
	dm_secret_free(key.sealed);
	return result;
}

Datum
digime_add_contract(PG_FUNCTION_ARGS)
{
	return dm_call_run(fcinfo, "add_contract", true, add_contract_body);
}

static Datum
rotate_contract_key_body(DmCall *call)
{
	FunctionCallInfo fcinfo = call->fcinfo;
	char	   *contract_id = dm_arg_text(fcinfo, 0, "contract_id");
	ContractKey key;
	Datum		result;

	call->audit.contract_id = contract_id;
	contract_key_arg(fcinfo, 1, contract_id, &key);
	dm_call_enter(call);
	dm_store_contract_rotate(contract_id, key.sealed, key.bits, key.fingerprint);
	dm_store_contract_info(contract_id);
	result = dm_call_result_row(call, NULL);
	dm_secret_free(key.sealed);
	return result;
}

Datum
digime_rotate_contract_key(PG_FUNCTION_ARGS)
{
	return dm_call_run(fcinfo, "rotate_contract_key", true, rotate_contract_key_body);
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

static Datum
drop_contract_body(DmCall *call)
{
	FunctionCallInfo fcinfo = call->fcinfo;
	char	   *contract_id = dm_arg_text(fcinfo, 0, "contract_id");
	bool		cascade = !PG_ARGISNULL(1) && PG_GETARG_BOOL(1);
	List	   *grantees;
	ListCell   *lc;

	call->audit.contract_id = contract_id;
	dm_call_enter(call);
	grantees = dm_store_contract_drop(contract_id, cascade);
	foreach(lc, grantees)
		if (!dm_store_role_has_grants(lfirst_oid(lc)))
			dm_store_role_privileges(lfirst_oid(lc), false);
	PG_RETURN_VOID();
}

Datum
digime_drop_contract(PG_FUNCTION_ARGS)
{
	return dm_call_run(fcinfo, "drop_contract", true, drop_contract_body);
}

/* The (contract_id, role) arguments of grant and revoke, audited; enters the call. */
static char *
contract_role_args(DmCall *call, Oid *role)
{
	char	   *contract_id = dm_arg_text(call->fcinfo, 0, "contract_id");

	*role = role_arg(call->fcinfo, 1);
	call->audit.contract_id = contract_id;
	call->audit.reference = GetUserNameFromId(*role, false);
	dm_call_enter(call);
	return contract_id;
}

static Datum
grant_contract_body(DmCall *call)
{
	Oid			role;
	char	   *contract_id = contract_role_args(call, &role);

	dm_store_grant_add(contract_id, role);
	dm_store_role_privileges(role, true);
	PG_RETURN_VOID();
}

Datum
digime_grant_contract(PG_FUNCTION_ARGS)
{
	return dm_call_run(fcinfo, "grant_contract", true, grant_contract_body);
}

static Datum
revoke_contract_body(DmCall *call)
{
	Oid			role;
	char	   *contract_id = contract_role_args(call, &role);

	dm_store_grant_remove(contract_id, role);
	if (!dm_store_role_has_grants(role))
		dm_store_role_privileges(role, false);
	PG_RETURN_VOID();
}

Datum
digime_revoke_contract(PG_FUNCTION_ARGS)
{
	return dm_call_run(fcinfo, "revoke_contract", true, revoke_contract_body);
}

static Datum
revoke_token_body(DmCall *call)
{
	int64		token_id = DatumGetInt64(call->fcinfo->args[0].value);

	call->audit.token_id = token_id;
	dm_call_enter(call);
	PG_RETURN_BOOL(dm_store_token_revoke(token_id));
}

Datum
digime_revoke_token(PG_FUNCTION_ARGS)
{
	return dm_call_run(fcinfo, "revoke", true, revoke_token_body);
}

static Datum
reencrypt_secrets_body(DmCall *call)
{
	dm_call_enter(call);
	(void) dm_crypt_enabled();	/* refuses when the key file could not be loaded */
	PG_RETURN_INT64((int64) dm_store_reencrypt_secrets());
}

Datum
digime_reencrypt_secrets(PG_FUNCTION_ARGS)
{
	return dm_call_run(fcinfo, "reencrypt_secrets", true, reencrypt_secrets_body);
}

Datum
digime_encryption_key_id(PG_FUNCTION_ARGS)
{
	if (!dm_crypt_enabled())
		PG_RETURN_NULL();
	PG_RETURN_TEXT_P(cstring_to_text(dm_crypt_key_id()));
}
