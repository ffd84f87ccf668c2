/*-------------------------------------------------------------------------
 *
 * crypt.c
 *	  Optional envelope encryption of secrets at rest (contract private keys,
 *	  access and refresh tokens, code verifiers) with AES-256-GCM.
 *
 * The 256-bit key is read from digime.key_file once, by the postmaster
 * while it loads shared_preload_libraries, and inherited by every backend;
 * SQL can neither read nor set it.  The file must be outside the data
 * directory (so that a copy of the data directory or a base backup does not
 * carry it) and must not be accessible to other users.
 *
 * A sealed value is text:
 *		dmenc1:<key id>:<base64(12-byte IV || ciphertext || 16-byte tag)>
 * where the key id is the first 8 bytes (hex) of SHA-256("digime key id" ||
 * key), and the associated data names the table, column and row
 * ("digime/user_tokens/access_token/42"), so that a sealed value copied to
 * another row or column does not decrypt.
 *
 * Without a key file, values are stored as plaintext.  If digime.key_file
 * is set but digime was not preloaded, the key cannot be loaded; then every
 * write of a secret and every read of a sealed one fails, rather than
 * silently storing plaintext (checked at each use, so also after a reload).  During key rotation digime.previous_key_file
 * names the old key, which is then used for reading only.
 *
 * IDENTIFICATION
 *	  src/crypt.c
 *
 *-------------------------------------------------------------------------
 */
#include "digime.h"

#include "crypt.h"
#include "guc.h"

#include "common/base64.h"
#include "miscadmin.h"
#include "storage/fd.h"
#include "utils/builtins.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/err.h>

#define SEAL_PREFIX		"dmenc1:"
#define KEY_LEN			32
#define KEY_ID_LEN		16			/* hex characters */
#define IV_LEN			12
#define TAG_LEN			16

typedef struct DmKey
{
	bool		loaded;
	unsigned char key[KEY_LEN];
	char		id[KEY_ID_LEN + 1];
} DmKey;

static DmKey current_key;
static DmKey previous_key;
static bool preloaded = false;	/* loaded by the postmaster at start */

static void
key_file_fatal(const char *guc, const char *path, const char *why)
{
	ereport(FATAL,
			(errcode(ERRCODE_CONFIG_FILE_ERROR),
			 errmsg("could not load %s \"%s\"", guc, path),
			 errdetail("%s", why)));
}

/* True when path lies inside the data directory. */
static bool
inside_data_dir(const char *path)
{
	char	   *real_file = realpath(path, NULL);
	char	   *real_data = DataDir ? realpath(DataDir, NULL) : NULL;
	bool		inside = false;

	if (real_file != NULL && real_data != NULL)
	{
		size_t		n = strlen(real_data);

		inside = strncmp(real_file, real_data, n) == 0 && real_file[n] == '/';
	}
	free(real_file);
	free(real_data);
	return inside;
}

static void
load_key(const char *guc, const char *path, DmKey *k)
{
	int			fd;
	struct stat st;
	char		buf[128];
	ssize_t		n;
	char	   *p;
	size_t		len;
	unsigned char digest[EVP_MAX_MD_SIZE];
	unsigned int dlen;
	EVP_MD_CTX *md;
	bool		ok;

	if (!is_absolute_path(path))
		key_file_fatal(guc, path, "The path must be absolute.");
	if (inside_data_dir(path))
		key_file_fatal(guc, path, "The key file must be outside the data directory.");
	fd = open(path, O_RDONLY | PG_BINARY, 0);
	if (fd < 0)
		key_file_fatal(guc, path, strerror(errno));
	if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode))
	{
		close(fd);
		key_file_fatal(guc, path, "It is not a regular file.");
	}
	if ((st.st_mode & (S_IWGRP | S_IRWXO)) != 0)
	{
		close(fd);
		key_file_fatal(guc, path, "Other users may access it; use mode 0600 or 0640.");
	}
	n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (n < 0)
		key_file_fatal(guc, path, strerror(errno));
	buf[n] = '\0';

	/* 64 hex digits (openssl rand -hex 32), optionally with white space, or 32 raw bytes */
	p = buf;
	while (*p == ' ' || *p == '\n' || *p == '\r' || *p == '\t')
		p++;
	len = strspn(p, "0123456789abcdefABCDEF");
	if (len == KEY_LEN * 2 && strspn(p + len, " \r\n\t") == strlen(p + len))
		hex_decode(p, len, (char *) k->key);
	else if (n == KEY_LEN)
		memcpy(k->key, buf, KEY_LEN);
	else
	{
		explicit_bzero(buf, sizeof(buf));
		key_file_fatal(guc, path, "It must hold 64 hexadecimal digits or exactly 32 bytes.");
	}
	explicit_bzero(buf, sizeof(buf));

	md = EVP_MD_CTX_new();
	ok = md != NULL && EVP_DigestInit_ex(md, EVP_sha256(), NULL) == 1 &&
		EVP_DigestUpdate(md, "digime key id", 13) == 1 &&
		EVP_DigestUpdate(md, k->key, KEY_LEN) == 1 &&
		EVP_DigestFinal_ex(md, digest, &dlen) == 1;
	EVP_MD_CTX_free(md);
	if (!ok)
		key_file_fatal(guc, path, "SHA-256 failed.");
	hex_encode((char *) digest, KEY_ID_LEN / 2, k->id);
	k->id[KEY_ID_LEN] = '\0';
	k->loaded = true;
}

void
dm_crypt_init(bool preloading)
{
	preloaded = preloading;
	if (!preloading)
		return;
	if (dm_key_file != NULL && dm_key_file[0] != '\0')
		load_key("digime.key_file", dm_key_file, &current_key);
	if (dm_previous_key_file != NULL && dm_previous_key_file[0] != '\0')
		load_key("digime.previous_key_file", dm_previous_key_file, &previous_key);
}

static void
check_configuration(void)
{
	if (!preloaded && dm_key_file != NULL && dm_key_file[0] != '\0')
		ereport(ERROR,
				(errcode(ERRCODE_CONFIG_FILE_ERROR),
				 errmsg("digime.key_file is set, but digime is not in shared_preload_libraries"),
				 errdetail("The key can only be loaded at server start; secrets are neither read nor written without it."),
				 errhint("Add digime to shared_preload_libraries and restart the server.")));
}

bool
dm_crypt_enabled(void)
{
	check_configuration();
	return current_key.loaded;
}

const char *
dm_crypt_key_id(void)
{
	return current_key.loaded ? current_key.id : NULL;
}

void
dm_secret_free(char *secret)
{
	if (secret != NULL)
	{
		explicit_bzero(secret, strlen(secret));
		pfree(secret);
	}
}

char *
dm_seal(const char *plain, const char *aad)
{
	EVP_CIPHER_CTX *ctx;
	unsigned char iv[IV_LEN];
	size_t		plen = strlen(plain);
	unsigned char *buf;
	int			outl = 0,
				finl = 0;
	bool		ok;
	char	   *b64;
	int			b64len;
	char	   *result;

	if (strncmp(plain, SEAL_PREFIX, strlen(SEAL_PREFIX)) == 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("a secret must not start with \"%s\"", SEAL_PREFIX)));
	if (!dm_crypt_enabled())
		return pstrdup(plain);

	if (!pg_strong_random(iv, IV_LEN))
		ereport(ERROR,
				(errcode(ERRCODE_INTERNAL_ERROR),
				 errmsg("could not generate random values")));
	buf = palloc(IV_LEN + plen + TAG_LEN);
	memcpy(buf, iv, IV_LEN);

	ctx = EVP_CIPHER_CTX_new();
	ok = ctx != NULL &&
		EVP_EncryptInit_ex(ctx, EVP_aes_256_gcm(), NULL, current_key.key, iv) == 1 &&
		EVP_EncryptUpdate(ctx, NULL, &outl, (const unsigned char *) aad, strlen(aad)) == 1 &&
		EVP_EncryptUpdate(ctx, buf + IV_LEN, &outl, (const unsigned char *) plain, plen) == 1 &&
		EVP_EncryptFinal_ex(ctx, buf + IV_LEN + outl, &finl) == 1 &&
		EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_GET_TAG, TAG_LEN, buf + IV_LEN + plen) == 1;
	EVP_CIPHER_CTX_free(ctx);
	ERR_clear_error();
	if (!ok)
		ereport(ERROR,
				(errcode(ERRCODE_EXTERNAL_ROUTINE_EXCEPTION),
				 errmsg("could not encrypt a secret")));

	b64len = pg_b64_enc_len(IV_LEN + plen + TAG_LEN);
	b64 = palloc(b64len + 1);
	b64len = pg_b64_encode((char *) buf, IV_LEN + plen + TAG_LEN, b64, b64len);
	b64[b64len] = '\0';
	pfree(buf);
	result = psprintf("%s%s:%s", SEAL_PREFIX, current_key.id, b64);
	pfree(b64);
	return result;
}

static const DmKey *
key_by_id(const char *id)
{
	if (current_key.loaded && strncmp(id, current_key.id, KEY_ID_LEN) == 0)
		return &current_key;
	if (previous_key.loaded && strncmp(id, previous_key.id, KEY_ID_LEN) == 0)
		return &previous_key;
	return NULL;
}

char *
dm_open(const char *stored, const char *aad)
{
	const char *p;
	const DmKey *k;
	unsigned char *raw;
	int			rawlen;
	char	   *plain;
	int			outl = 0,
				finl = 0;
	EVP_CIPHER_CTX *ctx;
	bool		ok;

	if (strncmp(stored, SEAL_PREFIX, strlen(SEAL_PREFIX)) != 0)
		return pstrdup(stored);

	check_configuration();
	p = stored + strlen(SEAL_PREFIX);
	if (strlen(p) < KEY_ID_LEN + 1 || p[KEY_ID_LEN] != ':')
		ereport(ERROR,
				(errcode(ERRCODE_DATA_CORRUPTED),
				 errmsg("stored secret is not a valid sealed value")));
	k = key_by_id(p);
	if (k == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_CONFIG_FILE_ERROR),
				 errmsg("stored secret is encrypted with key %.*s, which is not loaded",
						KEY_ID_LEN, p),
				 errhint("Set digime.key_file (or, during key rotation, digime.previous_key_file) "
						 "to the file holding that key and restart the server.")));
	p += KEY_ID_LEN + 1;

	raw = palloc(pg_b64_dec_len(strlen(p)) + 1);
	rawlen = pg_b64_decode(p, strlen(p), (char *) raw, pg_b64_dec_len(strlen(p)));
	if (rawlen < IV_LEN + TAG_LEN)
		ereport(ERROR,
				(errcode(ERRCODE_DATA_CORRUPTED),
				 errmsg("stored secret is not a valid sealed value")));
	plain = palloc(rawlen - IV_LEN - TAG_LEN + 1);

	ctx = EVP_CIPHER_CTX_new();
	ok = ctx != NULL &&
		EVP_DecryptInit_ex(ctx, EVP_aes_256_gcm(), NULL, k->key, raw) == 1 &&
		EVP_DecryptUpdate(ctx, NULL, &outl, (const unsigned char *) aad, strlen(aad)) == 1 &&
		EVP_DecryptUpdate(ctx, (unsigned char *) plain, &outl, raw + IV_LEN,
						  rawlen - IV_LEN - TAG_LEN) == 1 &&
		EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_TAG, TAG_LEN,
							raw + rawlen - TAG_LEN) == 1 &&
		EVP_DecryptFinal_ex(ctx, (unsigned char *) plain + outl, &finl) == 1;
	EVP_CIPHER_CTX_free(ctx);
	ERR_clear_error();
	pfree(raw);
	if (!ok)
	{
		pfree(plain);
		ereport(ERROR,
				(errcode(ERRCODE_DATA_CORRUPTED),
				 errmsg("could not decrypt a stored secret"),
				 errdetail("Authentication failed: the value was altered, or belongs to another row (%s).",
						   aad)));
	}
	plain[outl + finl] = '\0';
	return plain;
}

bool
dm_sealed_current(const char *stored)
{
	bool		sealed = strncmp(stored, SEAL_PREFIX, strlen(SEAL_PREFIX)) == 0;

	if (!dm_crypt_enabled())
		return !sealed;
	return sealed && strncmp(stored + strlen(SEAL_PREFIX), current_key.id, KEY_ID_LEN) == 0;
}
