/*-------------------------------------------------------------------------
 *
 * jws.c
 *	  JSON Web Signature, compact serialization (RFC 7515), algorithm PS512
 *	  only (RFC 7518 §3.5: RSASSA-PSS with SHA-512, MGF1 with SHA-512 and a
 *	  salt as long as the hash, 64 bytes).  base64url (RFC 4648 §5, no
 *	  padding) on top of PostgreSQL's base64.
 *
 * IDENTIFICATION
 *	  src/jws.c
 *
 *-------------------------------------------------------------------------
 */
#include "digime.h"

#include "jose.h"
#include "util.h"

#include "common/base64.h"
#include "utils/memutils.h"

#include <openssl/err.h>
#include <openssl/rsa.h>

/* PS512 salt length: the SHA-512 digest length (RFC 7518 §3.5) */
#define PS512_SALT_LEN 64

/* The only client JWS header digi.me's SDK sends (protocol §3.1). */
static const char jws_header[] = "{\"alg\":\"PS512\",\"typ\":\"JWT\"}";

char *
dm_base64url_encode(const unsigned char *data, size_t len)
{
	int			enclen = pg_b64_enc_len((int) len);
	char	   *out = palloc(enclen + 1);
	int			n;

	n = pg_b64_encode((const char *) data, (int) len, out, enclen);
	if (n < 0)
		elog(ERROR, "base64 encoding failed");
	while (n > 0 && out[n - 1] == '=')
		n--;
	out[n] = '\0';
	for (int i = 0; i < n; i++)
	{
		if (out[i] == '+')
			out[i] = '-';
		else if (out[i] == '/')
			out[i] = '_';
	}
	return out;
}

unsigned char *
dm_base64url_decode(const char *s, size_t len, size_t *outlen)
{
	char	   *std;
	size_t		padded;
	int			declen;
	unsigned char *out;
	int			n;

	if (len % 4 == 1 || len > MaxAllocSize / 2)
		return NULL;
	padded = (len + 3) / 4 * 4;
	std = palloc(padded + 1);
	for (size_t i = 0; i < len; i++)
	{
		char		c = s[i];

		if (c == '-')
			c = '+';
		else if (c == '_')
			c = '/';
		else if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') ||
				   (c >= '0' && c <= '9')))
		{
			pfree(std);
			return NULL;
		}
		std[i] = c;
	}
	for (size_t i = len; i < padded; i++)
		std[i] = '=';
	std[padded] = '\0';

	declen = pg_b64_dec_len((int) padded);
	out = palloc(declen + 1);
	n = pg_b64_decode(std, (int) padded, (char *) out, declen);
	pfree(std);
	if (n < 0)
	{
		pfree(out);
		return NULL;
	}
	out[n] = '\0';
	*outlen = (size_t) n;
	return out;
}

/* Sets the PS512 parameters on a sign/verify context. */
static bool
set_ps512(EVP_PKEY_CTX *pctx)
{
	return EVP_PKEY_CTX_set_rsa_padding(pctx, RSA_PKCS1_PSS_PADDING) > 0 &&
		EVP_PKEY_CTX_set_rsa_mgf1_md(pctx, EVP_sha512()) > 0 &&
		EVP_PKEY_CTX_set_rsa_pss_saltlen(pctx, PS512_SALT_LEN) > 0;
}

char *
dm_jws_sign_ps512(EVP_PKEY *key, const char *claims_json)
{
	StringInfoData input;
	EVP_MD_CTX *md = NULL;
	EVP_PKEY_CTX *pctx = NULL;
	unsigned char *sig = NULL;
	size_t		siglen = 0;
	bool		ok = false;
	char	   *enc;

	initStringInfo(&input);
	enc = dm_base64url_encode((const unsigned char *) jws_header, strlen(jws_header));
	appendStringInfoString(&input, enc);
	appendStringInfoChar(&input, '.');
	enc = dm_base64url_encode((const unsigned char *) claims_json, strlen(claims_json));
	appendStringInfoString(&input, enc);

	/* allocate first: nothing may raise while OpenSSL objects are live */
	siglen = EVP_PKEY_get_size(key);
	sig = palloc(siglen);
	md = EVP_MD_CTX_new();
	ok = md != NULL &&
		EVP_DigestSignInit(md, &pctx, EVP_sha512(), NULL, key) > 0 &&
		set_ps512(pctx) &&
		EVP_DigestSign(md, sig, &siglen, (unsigned char *) input.data, input.len) > 0;
	EVP_MD_CTX_free(md);		/* frees pctx too */
	ERR_clear_error();
	if (!ok)
		ereport(ERROR,
				(errcode(ERRCODE_EXTERNAL_ROUTINE_EXCEPTION),
				 errmsg("could not sign the request with the contract key")));

	appendStringInfoChar(&input, '.');
	appendStringInfoString(&input, dm_base64url_encode(sig, siglen));
	pfree(sig);
	return input.data;
}

bool
dm_jws_parse(const char *compact, DmJws *out)
{
	const char *dot1 = strchr(compact, '.');
	const char *dot2 = dot1 ? strchr(dot1 + 1, '.') : NULL;
	unsigned char *part;
	size_t		len;

	memset(out, 0, sizeof(*out));
	if (dot1 == NULL || dot2 == NULL || strchr(dot2 + 1, '.') != NULL)
		return false;

	part = dm_base64url_decode(compact, dot1 - compact, &len);
	if (part == NULL || (out->header = dm_json_parse((char *) part, len)) == NULL ||
		!JB_ROOT_IS_OBJECT(out->header))
		return false;

	part = dm_base64url_decode(dot1 + 1, dot2 - dot1 - 1, &len);
	if (part == NULL || (out->payload = dm_json_parse((char *) part, len)) == NULL ||
		!JB_ROOT_IS_OBJECT(out->payload))
		return false;

	/* an empty signature (alg "none") parses; it never verifies */
	out->signature = dm_base64url_decode(dot2 + 1, strlen(dot2 + 1), &out->signature_len);
	if (out->signature == NULL)
		return false;

	out->signing_input = compact;
	out->signing_input_len = dot2 - compact;
	return true;
}

bool
dm_jws_verify_ps512(EVP_PKEY *key, const DmJws *jws)
{
	EVP_MD_CTX *md = EVP_MD_CTX_new();
	EVP_PKEY_CTX *pctx = NULL;
	bool		ok;

	ok = md != NULL &&
		EVP_DigestVerifyInit(md, &pctx, EVP_sha512(), NULL, key) > 0 &&
		set_ps512(pctx) &&
		EVP_DigestVerify(md, jws->signature, jws->signature_len,
						 (const unsigned char *) jws->signing_input,
						 jws->signing_input_len) == 1;
	EVP_MD_CTX_free(md);
	ERR_clear_error();
	return ok;
}
