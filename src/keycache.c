/*-------------------------------------------------------------------------
 *
 * keycache.c
 *	  Parsed contract private keys, cached per process.
 *
 * Parsing a PEM key costs about 0.4 ms, more than signing with it; and an
 * EVP_PKEY that is reused keeps OpenSSL's RSA blinding state.  So each
 * process keeps the keys it has used, keyed by contract id and by the
 * SHA-256 of the stored column value (the PEM, or its sealed form).  Every
 * use reads the contract row first, so the version check sees the current
 * value: digime_rotate_contract_key, a re-encryption under a new key file,
 * or a contract dropped and added again (in any backend) changes the stored
 * value and the key is parsed afresh; a dropped contract is never looked up.
 *
 * Keys are reference counted (EVP_PKEY_up_ref): a caller holds its own
 * reference, tied to a memory context, so replacing an entry never frees a
 * key that is still in use.
 *
 * IDENTIFICATION
 *	  src/keycache.c
 *
 *-------------------------------------------------------------------------
 */
#include "digime.h"

#include "crypt.h"
#include "jose.h"

#include "utils/memutils.h"

#include <openssl/sha.h>

#define KEYCACHE_SIZE 32

typedef struct KeyEntry
{
	char	   *contract_id;	/* NULL: free entry */
	unsigned char version[SHA256_DIGEST_LENGTH];
	EVP_PKEY   *key;
	uint64		last_used;
} KeyEntry;

static KeyEntry cache[KEYCACHE_SIZE];
static uint64 use_counter = 0;

static void
release_key(void *arg)
{
	EVP_PKEY_free((EVP_PKEY *) arg);
}

static void
entry_clear(KeyEntry *e)
{
	if (e->contract_id)
		pfree(e->contract_id);
	EVP_PKEY_free(e->key);
	memset(e, 0, sizeof(*e));
}

/* The entry for contract_id, or the entry to replace (free or least recently used). */
static KeyEntry *
entry_for(const char *contract_id)
{
	KeyEntry   *victim = &cache[0];

	for (int i = 0; i < KEYCACHE_SIZE; i++)
	{
		KeyEntry   *e = &cache[i];

		if (e->contract_id != NULL && strcmp(e->contract_id, contract_id) == 0)
			return e;
		if (victim->contract_id != NULL &&
			(e->contract_id == NULL || e->last_used < victim->last_used))
			victim = e;
	}
	return victim;
}

/* Parses the stored key; raises XX001 when it is unusable. */
static EVP_PKEY *
parse_stored(const char *contract_id, const char *stored)
{
	char	   *pem = dm_open(stored, psprintf("digime/contracts/private_key/%s", contract_id));
	const char *why;
	EVP_PKEY   *key = dm_private_key_parse(pem, &why);

	dm_secret_free(pem);
	if (key == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_DATA_CORRUPTED),
				 errmsg("stored private key of digi.me contract \"%s\" is unusable", contract_id),
				 errdetail("%s", why)));
	return key;
}

EVP_PKEY *
dm_contract_key(const char *contract_id, const char *stored, MemoryContext owner)
{
	unsigned char version[SHA256_DIGEST_LENGTH];
	KeyEntry   *e = entry_for(contract_id);
	MemoryContextCallback *cb;

	SHA256((const unsigned char *) stored, strlen(stored), version);
	if (e->contract_id == NULL || strcmp(e->contract_id, contract_id) != 0 ||
		memcmp(e->version, version, sizeof(version)) != 0)
	{
		EVP_PKEY   *key = parse_stored(contract_id, stored);
		char	   *id = MemoryContextStrdup(TopMemoryContext, contract_id);

		entry_clear(e);
		e->contract_id = id;
		e->key = key;
		memcpy(e->version, version, sizeof(version));
	}
	e->last_used = ++use_counter;

	/* the callback first: nothing may fail once the reference is taken */
	cb = MemoryContextAlloc(owner, sizeof(MemoryContextCallback));
	cb->func = release_key;
	cb->arg = e->key;
	EVP_PKEY_up_ref(e->key);
	MemoryContextRegisterResetCallback(owner, cb);
	return e->key;
}
