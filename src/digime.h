/*-------------------------------------------------------------------------
 *
 * digime.h
 *	  Definitions shared by every file of the digime extension: digi.me
 *	  user authorization (OAuth 2.0 with PKCE, PS512-signed request JWTs)
 *	  from SQL.  Each module has its own header for its functions.
 *
 * Every function of the extension raises ERROR with a documented SQLSTATE
 * (README.md, "Errors") rather than returning failure, unless its comment
 * says otherwise.  No function puts a secret (private key, token, code,
 * code_verifier) into an error message.
 *
 * IDENTIFICATION
 *	  src/digime.h
 *
 *-------------------------------------------------------------------------
 */
#ifndef DIGIME_H
#define DIGIME_H

#include "postgres.h"

#include "datatype/timestamp.h"
#include "fmgr.h"
#include "lib/stringinfo.h"
#include "nodes/pg_list.h"
#include "utils/jsonb.h"

#ifndef DIGIME_VERSION
#define DIGIME_VERSION "1.1"
#endif

/* digime-specific SQLSTATEs (class YD, implementation-defined range) */
#define ERRCODE_DIGIME_API_ERROR			MAKE_SQLSTATE('Y','D','0','0','0')
#define ERRCODE_DIGIME_INVALID_TOKEN		MAKE_SQLSTATE('Y','D','0','0','1')
#define ERRCODE_DIGIME_INVALID_CLIENT		MAKE_SQLSTATE('Y','D','0','0','2')
#define ERRCODE_DIGIME_INVALID_REDIRECT_URI MAKE_SQLSTATE('Y','D','0','0','3')
#define ERRCODE_DIGIME_INSUFFICIENT_SCOPE	MAKE_SQLSTATE('Y','D','0','0','4')
#define ERRCODE_DIGIME_SDK_INVALID			MAKE_SQLSTATE('Y','D','0','0','5')
#define ERRCODE_DIGIME_SERVICE_AUTHORIZATION MAKE_SQLSTATE('Y','D','0','0','6')
#define ERRCODE_DIGIME_INVALID_GRANT		MAKE_SQLSTATE('Y','D','0','0','7')
#define ERRCODE_DIGIME_MALFORMED_RESPONSE	MAKE_SQLSTATE('Y','D','0','1','0')
#define ERRCODE_DIGIME_VERIFICATION_FAILED	MAKE_SQLSTATE('Y','D','0','1','1')
#define ERRCODE_DIGIME_CALLBACK_ERROR		MAKE_SQLSTATE('Y','D','0','2','0')
#define ERRCODE_DIGIME_AUTHORIZATION_EXPIRED MAKE_SQLSTATE('Y','D','0','2','1')
#define ERRCODE_DIGIME_AUTHORIZATION_USED	MAKE_SQLSTATE('Y','D','0','2','2')
#define ERRCODE_DIGIME_AUTHORIZATION_SUPERSEDED MAKE_SQLSTATE('Y','D','0','2','3')
#define ERRCODE_DIGIME_NEEDS_REAUTHORIZATION MAKE_SQLSTATE('Y','D','0','3','0')
#define ERRCODE_DIGIME_TOKEN_REVOKED		MAKE_SQLSTATE('Y','D','0','3','1')
#define ERRCODE_DIGIME_WORKER_LOST			MAKE_SQLSTATE('Y','D','0','4','0')

/* Longest text argument accepted (a PEM key, a callback URL, a state). */
#define DM_MAX_TEXT_ARG 16384
/* Longest token value, code or code_verifier stored or sent. */
#define DM_MAX_TOKEN_LEN 8192
/* Longest identifier or reference (user id, consent id, account reference). */
#define DM_MAX_ID_LEN 1024

/*
 * On whose behalf a request runs: the SQL caller, or for inbox rows the
 * row's owner.  Rows are the actor's when owner_role = role and, with
 * end_user set, end_user matches; an administrator may use every row.
 */
typedef struct DmActor
{
	Oid			role;
	bool		is_admin;		/* superuser or has the extension owner's privileges */
	char	   *end_user;		/* digime.end_user, or NULL */
} DmActor;

#endif							/* DIGIME_H */
