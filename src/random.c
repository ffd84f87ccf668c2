/*-------------------------------------------------------------------------
 *
 * random.c
 *	  Random strings for nonces and PKCE (RFC 7636, method S256), in the
 *	  digi.me SDK's form (protocol §3.2, §3.3), from pg_strong_random.
 *
 * IDENTIFICATION
 *	  src/random.c
 *
 *-------------------------------------------------------------------------
 */
#include "digime.h"

#include "crypt.h"
#include "jose.h"
#include "util.h"

#include "utils/builtins.h"

#include <openssl/sha.h>

static const char alnum[] =
"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";

#define ALNUM_COUNT 62
/* largest multiple of 62 that fits a byte: rejecting >= 248 keeps it unbiased */
#define ALNUM_LIMIT 248

char *
dm_random_alnum(int len)
{
	char	   *out = palloc(len + 1);
	unsigned char buf[64];
	int			have = 0,
				used = 0;

	for (int i = 0; i < len;)
	{
		if (used == have)
		{
			if (!pg_strong_random(buf, sizeof(buf)))
				ereport(ERROR,
						(errcode(ERRCODE_INTERNAL_ERROR),
						 errmsg("could not generate random values")));
			have = sizeof(buf);
			used = 0;
		}
		if (buf[used] < ALNUM_LIMIT)
			out[i++] = alnum[buf[used] % ALNUM_COUNT];
		used++;
	}
	explicit_bzero(buf, sizeof(buf));
	out[len] = '\0';
	return out;
}

char *
dm_pkce_verifier(void)
{
	char	   *raw = dm_random_alnum(32);
	char	   *verifier = dm_base64url_encode((unsigned char *) raw, 32);

	dm_secret_free(raw);
	return verifier;
}

char *
dm_pkce_challenge(const char *verifier)
{
	unsigned char digest[SHA256_DIGEST_LENGTH];

	if (EVP_Digest(verifier, strlen(verifier), digest, NULL, EVP_sha256(), NULL) != 1)
		elog(ERROR, "SHA-256 failed");
	return dm_base64url_encode(digest, sizeof(digest));
}

char *
dm_sha256_hex(const char *s)
{
	unsigned char digest[SHA256_DIGEST_LENGTH];
	char	   *hex = palloc(SHA256_DIGEST_LENGTH * 2 + 1);

	if (EVP_Digest(s, strlen(s), digest, NULL, EVP_sha256(), NULL) != 1)
		elog(ERROR, "SHA-256 failed");
	hex[hex_encode((const char *) digest, SHA256_DIGEST_LENGTH, hex)] = '\0';
	return hex;
}
