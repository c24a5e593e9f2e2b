/* Renders the plugin's index.json in the app's plugin form (form.jsx) in headless Debian Chromium, checks what
 * it shows, fills it in as a user would, presses "Save Training Template" and writes the `config` the app
 * would save, plus a screenshot of the filled form.
 *
 *   node drive_form.mjs CONFIG_OUT.json SCREENSHOT_OUT.png
 *
 * Prints ajv's meta-schema verdicts; exits 1 saying why on any failure. The page is bundled in
 * memory with esbuild and served from 127.0.0.1, so nothing is written but the two outputs.
 */
import { readFile, writeFile } from 'node:fs/promises';
import http from 'node:http';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { build } from 'esbuild';
import { chromium } from 'playwright-core';

const HERE = dirname(fileURLToPath(import.meta.url));
const MANIFEST = join(HERE, '..', '..', 'index.json');
const CHROMIUM = '/usr/bin/chromium'; // Debian's package: nothing is downloaded
const CHROMIUM_ARGS = ['--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
  '--disable-component-update', '--disable-sync'];
const DEADLINE_MS = 120_000;

class Failure extends Error {}

function check(ok, message) {
  if (!ok) throw new Failure(message);
}

async function bundle() {
  const result = await build({
    entryPoints: [join(HERE, 'form.jsx')], bundle: true, write: false, format: 'esm', jsx: 'automatic',
    target: 'chrome120', minify: true, define: { 'process.env.NODE_ENV': '"production"' }, logLevel: 'silent',
  });
  return result.outputFiles[0].contents;
}

/** A static server for the three files the page needs; resolves once listening, on a free port. */
async function serve(files) {
  const server = http.createServer((request, response) => {
    const file = files[new URL(request.url, 'http://127.0.0.1').pathname];
    if (file) response.writeHead(200, { 'content-type': file.type }).end(file.body);
    else response.writeHead(404).end();
  });
  await new Promise((listening) => server.listen(0, '127.0.0.1', listening));
  return server;
}

/** The control of one parameter. Found by its name attribute: rjsf's ids are the bare names (the app sets
 * idPrefix and idSeparator to ""), but Joy's FormControl gives the Joy inputs ids of its own. */
function field(page, name) {
  return page.locator(`#plugin_parameters [name="${name}"]`);
}

/** What the form shows: a control per parameter, none for the launcher's own parameters (the app sets
 * model, dataset and output folder itself), every ui:help text; and ajv's verdict on the schema. */
async function checkRendered(page, manifest) {
  const { missing, shown, helpMissing } = await page.evaluate(({ parameters, launcher, ui }) => {
    const form = document.getElementById('training-form');
    const control = (name) => form.querySelector(`#plugin_parameters [name="${name}"]`);
    const helps = new Set([...form.querySelectorAll('small')].map((small) => small.textContent));
    return {
      missing: parameters.filter((name) => !control(name)),
      shown: launcher.filter((name) => control(name) || document.getElementById(name)),
      helpMissing: parameters.filter((name) => ui[name]?.['ui:help'] && !helps.has(ui[name]['ui:help'])),
    };
  }, { parameters: Object.keys(manifest.parameters), launcher: Object.keys(manifest.launcher_parameters ?? {}),
    ui: manifest.parameters_ui });
  check(missing.length === 0, `no field rendered for: ${missing.join(', ')}`);
  check(shown.length === 0, `launcher parameters shown in the form: ${shown.join(', ')}`);
  check(helpMissing.length === 0, `ui:help not shown for: ${helpMissing.join(', ')}`);

  const { strictSchema, appSchema } = await page.evaluate(() => window.formCheck);
  console.log(`ajv meta-schema, form schema (top-level required, per-property flags stripped): ${
    strictSchema.valid ? 'valid' : 'INVALID'}`);
  console.log(`ajv meta-schema, raw manifest properties as the app passes them: ${
    appSchema.valid ? 'valid' : `INVALID (${appSchema.errors.join('; ')})`}`);
  check(strictSchema.valid, `the form's schema fails ajv's meta-schema: ${strictSchema.errors.join('; ')}`);
}

/** A user's edits, one per kind of widget. The expected values are asserted by tests/test_browser_form.py. */
async function fillLikeAUser(page) {
  await field(page, 'adaptor_name').fill('');
  await field(page, 'adaptor_name').pressSequentially('browser-lora');
  await field(page, 'trigger_word').pressSequentially('sks shape');
  const scheduler = field(page, 'lr_scheduler'); // the app's <select>, or radio buttons with "ui:widget": "radio"
  if (await scheduler.and(page.locator('select')).count()) await scheduler.selectOption('cosine');
  else await scheduler.and(page.getByLabel('cosine', { exact: true })).check();
  await field(page, 'random_flip').check();
  await field(page, 'log_to_tensorboard').uncheck();
  const slider = field(page, 'caption_dropout_rate');
  await slider.focus();
  for (let press = 0; press < 5; press += 1) await slider.press('ArrowRight'); // 5 steps of multipleOf 0.01
  await field(page, 'num_train_epochs').fill('1');
  await field(page, 'resolution').fill('32');
}

async function drive(configPath, screenshotPath) {
  const manifestText = await readFile(MANIFEST, 'utf8');
  const manifest = JSON.parse(manifestText);
  const server = await serve({
    '/': { type: 'text/html', body: await readFile(join(HERE, 'form.html')) },
    '/form.js': { type: 'text/javascript', body: await bundle() },
    '/index.json': { type: 'application/json', body: manifestText },
  });
  const browser = await chromium.launch({ executablePath: CHROMIUM, headless: true, args: CHROMIUM_ARGS });
  const pageErrors = [];
  try {
    const page = await browser.newPage({ viewport: { width: 1200, height: 900 } });
    page.on('pageerror', (error) => pageErrors.push(error.message));
    page.on('console', (message) => message.type() === 'error' && pageErrors.push(message.text()));
    await page.goto(`http://127.0.0.1:${server.address().port}/`);
    await page.waitForFunction(() => window.formCheck && document.querySelector('#plugin_parameters [name]'));
    await checkRendered(page, manifest);

    await fillLikeAUser(page);
    await page.getByRole('button', { name: 'Save Training Template' }).click();
    await page.waitForFunction(() => window.submittedConfig);
    const config = await page.evaluate(() => window.submittedConfig);
    const errors = await page.evaluate((saved) => window.formCheck.validateFormData(saved), config);
    check(errors.length === 0, `the saved config breaks the form's schema: ${errors.join('; ')}`);
    check(pageErrors.length === 0, `the page reported errors: ${pageErrors.join(' | ')}`);

    await page.screenshot({ path: screenshotPath, fullPage: true });
    await writeFile(configPath, `${JSON.stringify(config, null, 2)}\n`);
    console.log(`saved config (${Object.keys(config).length} keys) -> ${configPath}; screenshot -> ${screenshotPath}`);
  } catch (error) {
    if (pageErrors.length) console.error(`the page reported: ${pageErrors.join(' | ')}`);
    throw error;
  } finally {
    await browser.close();
    server.close();
  }
}

const [configPath, screenshotPath] = process.argv.slice(2);
if (!configPath || !screenshotPath) {
  console.error('usage: node drive_form.mjs CONFIG_OUT.json SCREENSHOT_OUT.png');
  process.exit(2);
}
setTimeout(() => {
  console.error(`drive_form: no result within ${DEADLINE_MS / 1000} s`);
  process.exit(1);
}, DEADLINE_MS).unref();
try {
  await drive(configPath, screenshotPath);
} catch (error) {
  console.error(`drive_form: ${error instanceof Failure ? error.message : error.stack}`);
  process.exit(1);
}
